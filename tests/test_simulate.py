"""The timeline simulator against timelines worked out by hand, and the
Gantt chart drawn from its spans."""
import pytest

from fdgbench.schedule import validate
from fdgbench.simulator import Link, StageCosts, library_pipeline, simulate, stage_costs
from fdgbench.method import make_method
from fdgbench.report.gantt import draw_gantt

FREE = Link(latency_s=0.0, bandwidth_Bps=float("inf"))
EVEN = [StageCosts(forward=1.0, backward=2.0, update=0.5, output_bytes=1e6)] * 2


def test_bp_runs_its_stages_one_after_another():
    # F0, F1, B1, B0 in series, then both stages update: 1 + 1 + 2 + 2 + 0.5.
    pred = simulate(make_method("bp"), EVEN, FREE)
    assert pred.iteration_s == pytest.approx(6.5)
    assert pred.utilisation == pytest.approx([3.5 / 6.5] * 2)


def test_fdg_keeps_every_balanced_stage_busy():
    # Each stage does B, U, F of different batches each iteration and never waits.
    pred = simulate(make_method("fdg"), EVEN, FREE)
    assert pred.iteration_s == pytest.approx(3.5)
    assert pred.utilisation == pytest.approx([1.0, 1.0])


def test_fdg_is_paced_by_its_slowest_stage():
    stages = [StageCosts(1.0, 2.0, 0.5, 1e6), StageCosts(2.0, 4.0, 0.5, 0.0)]
    pred = simulate(make_method("fdg"), stages, FREE)
    assert pred.iteration_s == pytest.approx(6.5)
    assert pred.utilisation == pytest.approx([3.5 / 6.5, 1.0])


def test_stages_slow_each_other_only_while_they_compute_together():
    """corun(2) = 1.5: two stages computing at once each run at 2/3 speed."""
    corun = {1: 1.0, 2: 1.5}.__getitem__
    # BP: F0 F1 B1 B0 one stage at a time (full speed), then both update together: 6 + 0.5 x 1.5.
    pred = simulate(make_method("bp"), EVEN, FREE, corun=corun)
    assert pred.iteration_s == pytest.approx(6.75)
    assert pred.utilisation == pytest.approx([(1 + 2 + 0.75) / 6.75] * 2)
    # FDG: both stages compute all the time, so all of their 3.5 s runs at 2/3 speed.
    assert simulate(make_method("fdg"), EVEN, FREE, corun=corun).iteration_s == pytest.approx(3.5 * 1.5)
    # With R = 2 replicas of each stage, two stages computing are four workers.
    four = {1: 1.0, 2: 1.0, 4: 2.0}.__getitem__
    assert simulate(make_method("fdg"), EVEN, FREE, replicas=2, corun=four).iteration_s == pytest.approx(
        (1.5 + 0.5) * 2)


def test_a_stage_runs_at_most_two_iterations_ahead_as_on_the_engine():
    """DGL sends nothing back, so only the engine's rule (a stage waits for
    its messages of two iterations back to be taken) keeps a fast stage 0
    from running ahead of a slow stage 1; without it the co-run term would
    fade as stage 0 ran out of work, and the prediction would drift with the
    number of iterations simulated."""
    stages = [StageCosts(forward=0.1, backward=0.2, update=0.05, local=0.2, output_bytes=1e6),
              StageCosts(forward=1.0, backward=2.0, update=0.05)]
    corun = {1: 1.0, 2: 1.5}.__getitem__
    preds = [simulate(make_method("dgl"), stages, FREE, iterations=n, corun=corun) for n in (20, 40, 80)]
    assert preds[0].iteration_s == pytest.approx(preds[1].iteration_s, rel=1e-12) == preds[2].iteration_s
    assert all(0 < u <= 1 + 1e-12 for p in preds for u in p.utilisation)
    began = {}  # (stage, iteration) -> its first action's start
    for s in preds[1].spans:
        began[s.stage, s.iteration] = min(began.get((s.stage, s.iteration), s.start), s.start)
    # stage 0 begins iteration u only after stage 1 began the iteration that takes its message of u - 2
    latency = next(a.latency for a in make_method("dgl").schedule(2, 5)[0] if a.op.name == "SEND_ACT")
    assert all(began[0, u] >= began[1, u - 2 + latency] - 1e-12 for u in range(2, 40 - latency))
    assert any(began[0, u] < began[1, u - 1] for u in range(1, 40))  # it does run ahead, into that slack


def test_a_micro_batch_costs_its_own_profile_where_one_is_given():
    """GPipe, K = 2 equal stages, M = 4, free link: (M + K - 1) micro-batch
    forward + backward pairs, then the (whole) update; a micro-batch of B/4
    images costs 0.4 + 0.7 s here, not a quarter of the batch's 1 + 2 s."""
    micro = [StageCosts(forward=0.4, backward=0.7, update=99.0, output_bytes=0.0)] * 2
    method = make_method("gpipe", microbatches=4)
    pred = simulate(method, EVEN, FREE, library=True, microbatch_stages=micro)
    assert pred.iteration_s == pytest.approx(5 * (0.4 + 0.7) + 0.5)
    assert simulate(method, EVEN, FREE, library=True).iteration_s == pytest.approx(5 * 3 / 4 + 0.5)


def test_transfer_time_delays_locked_messages_and_pipelined_ones_only_past_their_slack():
    link = Link(latency_s=0.1, bandwidth_Bps=1e7)  # 1 MB takes 0.1 + 0.1 s
    # BP waits for both messages every iteration: 6.5 + 2 x 0.2.
    assert simulate(make_method("bp"), EVEN, link).iteration_s == pytest.approx(6.9)
    # FDG's messages have an iteration to arrive: within the cycle F0 -> (A) -> F1 B1 -> (G) -> B0 U0 F0,
    # two iterations long (7 s), the work is 6.5 s, so 2 x 0.2 s of transfer hides.
    assert simulate(make_method("fdg"), EVEN, link).iteration_s == pytest.approx(3.5)
    # Past the slack the cycle sets the pace: (6.5 + 2 x 5) / 2 iterations.
    slow = Link(latency_s=5.0, bandwidth_Bps=float("inf"))
    assert simulate(make_method("fdg"), EVEN, slow).iteration_s == pytest.approx(8.25)


def test_dgl_runs_at_the_slowest_stages_pace_in_both_variants():
    # No gradient crosses a boundary, so even sync DGL's stage 0 never waits
    # for stage 1 (sends do not block): only the start differs.
    stages = [StageCosts(forward=1.0, backward=0.0, update=0.5, local=2.0, output_bytes=1e6),
              StageCosts(forward=1.0, backward=2.0, update=0.5)]
    for variant in ("sync", "pipelined"):
        pred = simulate(make_method("dgl", variant=variant), stages, FREE)
        assert pred.iteration_s == pytest.approx(3.5), variant
        assert pred.utilisation == pytest.approx([1.0, 1.0]), variant


def test_a_replayed_forward_is_charged_to_the_delayed_stages():
    # DDG: stage 0 runs F, B, U (3.5 s) and never waits. FR recomputes stage
    # 0's forward before its delayed backward (4.5 s); the last stage does not replay.
    assert simulate(make_method("ddg"), EVEN, FREE).iteration_s == pytest.approx(3.5)
    assert simulate(make_method("fr"), EVEN, FREE).iteration_s == pytest.approx(4.5)
    assert simulate(make_method("fdg", staleness="replay"), EVEN, FREE).iteration_s == pytest.approx(4.5)


def test_data_parallel_splits_compute_and_pays_the_all_reduce():
    # dp = BP placed as one stage of K replicas (placement.py).
    whole = StageCosts(forward=2.0, backward=4.0, update=1.0, parameter_bytes=8e9)
    bp = make_method("bp")
    assert simulate(bp, [whole], FREE, replicas=1).iteration_s == pytest.approx(7.0)
    link = Link(latency_s=0.0, bandwidth_Bps=1e9)
    # (2 + 4) / 2 compute, ring all-reduce 2 (K-1)/K x 8 GB / 1 GB/s = 8 s, update 1.
    assert simulate(bp, [whole], link, replicas=2).iteration_s == pytest.approx(12.0)


def test_replicas_of_pipelined_stages_halve_compute_and_messages_and_all_reduce_each_stage():
    # FDG x DP, K = 2, R = 2: each stage's B and F on half the batch (1 + 0.5), its update
    # of the whole stage (0.5) after the all-reduce: 2 (R-1)/R x 1 GB / 1 GB/s + 2 x 0.1 s
    # = 1.2 s; the messages (1 MB / 2 at 1 GB/s + 0.1 s) arrive before they are needed.
    stages = [StageCosts(forward=1.0, backward=2.0, update=0.5, output_bytes=1e6, parameter_bytes=1e9)] * 2
    link = Link(latency_s=0.1, bandwidth_Bps=1e9)
    pred = simulate(make_method("fdg"), stages, link, replicas=2)
    assert pred.iteration_s == pytest.approx(1.0 + 0.5 + 0.5 + 1.2)
    assert simulate(make_method("fdg"), stages, FREE, replicas=1).iteration_s == pytest.approx(3.5)


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
@pytest.mark.parametrize("k,m", [(2, 4), (4, 4), (4, 8), (8, 2)])
def test_the_librarys_pipelines_lose_the_bubble_to_equal_stages(kind, k, m):
    """torch.distributed.pipelining's GPipe and 1F1B with K equal stages and
    a free link: M micro-batches of 1/M of the batch's forward f and backward
    b take (M + K - 1)(f + b) / M per iteration, the pipeline's bubble
    (K - 1)/(M + K - 1) of it, then the update: the textbook's time, out of
    the timeline (the same for both schedules)."""
    f, b, u = 0.3, 0.6, 0.05
    method = make_method(kind, microbatches=m)
    pred = simulate(method, [StageCosts(f, b, u)] * k, Link(0.0, float("inf")), library=True)
    assert pred.iteration_s == pytest.approx((m + k - 1) * (f + b) / m + u, rel=1e-9)


def test_one_micro_batch_through_the_library_is_bps_timeline():
    """M = 1: every stage waits for the others, as BP does; messages priced as BP's."""
    stages = [StageCosts(0.2, 0.4, 0.01, output_bytes=4e6), StageCosts(0.3, 0.5, 0.02, output_bytes=4e5)]
    link = Link(1e-3, 1e9)
    bp = simulate(make_method("bp"), stages, link)
    assert simulate(make_method("gpipe", microbatches=1), stages, link, library=True).iteration_s == pytest.approx(
        bp.iteration_s, rel=1e-12)


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
def test_the_librarys_schedules_are_valid_schedules(kind):
    for k in (2, 3, 8):
        for m in (1, 2, 5, 8):
            validate(library_pipeline(kind, m), k, 4)


def test_stage_costs_sum_a_profile_over_a_partition():
    blocks = [{"forward_s": 1, "backward_s": 2, "update_s": 0.1, "output_bytes": b} for b in (10, 20, 30)]
    a, b = stage_costs(blocks, [range(0, 2), range(2, 3)])
    assert (a.forward, a.backward, a.update, a.output_bytes) == pytest.approx((2, 4, 0.2, 20))
    assert (b.forward, b.output_bytes) == (1, 30)


def test_simulated_timeline_follows_the_schedule_and_draws(tmp_path):
    pred = simulate(make_method("fdg"), EVEN * 2, FREE, iterations=12)  # K = 4
    forwards = [(s.stage, s.iteration, s.name) for s in pred.spans if s.category == "forward"]
    assert (3, 5, "F2") in forwards and (0, 5, "F5") in forwards  # stage k forwards batch t - k
    for stage in range(4):  # a stage's actions never overlap
        mine = sorted((s.start, s.start + s.duration) for s in pred.spans if s.stage == stage)
        assert all(end <= nxt + 1e-12 for (_, end), (nxt, _) in zip(mine, mine[1:]))
    paths = draw_gantt(pred.spans, tmp_path / "sim", "simulated fdg K=4", count=4)
    assert all(p.stat().st_size > 1000 for p in paths)
    drawn = paths[1].read_text()
    assert all(f"stage {k}" in drawn for k in range(4)) and "simulated fdg K=4" in drawn


def test_a_speedup_row_over_rounds_is_its_median_round_whole():
    # The median round's time with that same round's breakdown (not a median of each part, which would add up
    # to no round at all); an even count takes the lower middle. Beside it, the rounds' spread:
    # (slowest - fastest) / median, None for one round.
    from fdgbench.bench.speedup import _median_row

    rounds = [{"per_iter": t, "breakdown": [{"compute": t}]} for t in (0.9, 0.5, 0.7)]
    assert _median_row(rounds) == {**rounds[2], "spread": pytest.approx((0.9 - 0.5) / 0.7)}
    assert _median_row(rounds[:2]) == {**rounds[1], "spread": pytest.approx((0.9 - 0.5) / 0.5)}
    assert _median_row(rounds[:1]) == {**rounds[0], "spread": None}


def test_petra_is_charged_its_inversion_and_its_two_part_messages():
    """PETRA's delayed stage recomputes its forward (1 s) and first inverts its reversible blocks (their
    forward, 0.5 s): B0 = 2 + 1 + 0.5; the last stage does neither. With a free link stage 0 paces the
    pipeline (B0 + U0 + F0 = 5 s). Through 1 MB/s its 1 MB activation takes 1 s and its backward message,
    gradient and rebuilt activation, 2 s: the cycle F0 -> (A) -> F1 B1 -> (G) -> B0 U0 F0 spans two
    iterations, (1 + 1 + 1 + 2 + 2 + 3.5 + 0.5) / 2 = 5.5 s. FDG with replay: 4.5 s free, (1 + 1 + 1 + 2 + 1
    + 3 + 0.5) / 2 = 4.75 s through the link (one-part messages, no inversion)."""
    stages = [StageCosts(1.0, 2.0, 0.5, output_bytes=1e6, reversible_forward=0.5),
              StageCosts(1.0, 2.0, 0.5, reversible_forward=0.5)]
    slow = Link(latency_s=0.0, bandwidth_Bps=1e6)
    assert simulate(make_method("petra"), stages, FREE).iteration_s == pytest.approx(5.0)
    assert simulate(make_method("petra"), stages, slow).iteration_s == pytest.approx(5.5)
    replay = make_method("fdg", staleness="replay")
    assert simulate(replay, stages, FREE).iteration_s == pytest.approx(4.5)
    assert simulate(replay, stages, slow).iteration_s == pytest.approx(4.75)


def test_stage_costs_count_the_reversible_blocks_forward():
    blocks = [{"forward_s": f, "backward_s": 2, "update_s": 0.1, "output_bytes": 10} for f in (1, 2, 4)]
    a, b = stage_costs(blocks, [range(0, 2), range(2, 3)], reversible=[False, True, True])
    assert (a.reversible_forward, b.reversible_forward) == (2, 4)
    assert stage_costs(blocks, [range(0, 3)])[0].reversible_forward == 0
