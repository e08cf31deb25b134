"""Stage memory: the schedule's batch counts, the estimate against the
measured bytes, the record in every run, and the start-of-run guard."""
from __future__ import annotations

import json

import pytest
import torch

from fdgbench import memory
from fdgbench.data import synthetic_dataset
from fdgbench.errors import UserError
from fdgbench.memory import Linear, StageProbe, estimate
from fdgbench.method import all_methods, make_method
from fdgbench.schedule import batches_held, release_ops
from fdgbench.config import RunConfig
from fdgbench.train import build_run

from .helpers import model_for

TINY = ["--model", "tiny_resnet", "--dataset", "synthetic", "--epochs", "1", "--max-steps", "6", "--batch-size", "16",
        "--threads", "1"]


def graphs(method: str, k: int, **options) -> list[int]:
    return [max(g for g, _ in held) for held in batches_held(make_method(method, **options).schedule, k)]


def test_batches_held_come_from_the_schedule():
    # FDG: stage k's backward comes 2(K-1-k) iterations after its forward, backward first: 2(K-1-k) graphs.
    assert graphs("fdg", 4) == [6, 4, 2, 1]
    # DDG/FR: forward first, delay K-1-k: K-k graphs.
    assert graphs("ddg", 3) == [3, 2, 1] and graphs("fr", 3) == [3, 2, 1]
    assert graphs("bp", 4) == [1, 1, 1, 1] and graphs("dgl", 3) == [1, 1, 1]
    # DNI frees the graph at its synthetic backward but keeps the output until the true gradient arrives.
    assert batches_held(make_method("dni").schedule, 2)[0] == ((0, 1), (1, 0))
    assert release_ops(make_method("dni").schedule, 2)[0] == (release_ops(make_method("dgl").schedule, 2)[0][0],
                                                               release_ops(make_method("fdg").schedule, 2)[0][0])
    # A run too short to fill the pipeline holds fewer.
    assert [max(g for g, _ in h) for h in batches_held(make_method("fdg").schedule, 4, iterations=2)] == [2, 1, 0, 0]


def test_the_probe_counts_a_shared_storage_once():
    """A ReLU's output saved by the ReLU and by the next conv is one storage."""
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3))
    method = make_method("bp")
    from fdgbench.stage import StageContext

    worker = method.make_worker(StageContext(0, 2, module, torch.device("cpu")))
    probe = StageProbe(worker)
    probe.armed = True
    x = torch.randn(2, 3, 8, 8)
    out = probe.forward(0, x, torch.zeros(2, dtype=torch.long))
    # The input (saved by conv1), the ReLU's output (saved by the ReLU and by conv2: once) and the stage's
    # output; conv1's output is saved by no one (ReLU saves its result) and the weights are not counted.
    expected = x.nbytes + 2 * 4 * 8 * 8 * 4 + out.nbytes
    assert probe.held_bytes() == expected
    probe.backward(0, torch.zeros_like(out))
    assert probe.held_bytes() == 0  # released: nothing counted any more


def test_linear_fit_predicts_a_larger_batch():
    """The tolerance of the estimate: saved storages are affine in the batch
    (per-image activations + per-channel statistics + weight copies), so the
    two-batch fit predicts a directly profiled batch 16 exactly; 1% allows
    for a model where it would not be."""
    cfg = RunConfig(method="fdg", method_options={"staleness": "stash"}, model="tiny_resnet", splits=2)
    fitted = estimate(cfg, (3, 32, 32), 10)
    method = make_method("fdg", staleness="stash")
    trainer = build_run(RunConfig(method="fdg", method_options={"staleness": "stash"}, model="tiny_resnet", splits=2,
                                dataset="synthetic", batch_size=16, threads=1),
                      dataset=synthetic_dataset(10, train=32, test=16))
    releases = release_ops(method.schedule, 2)
    for k, worker in enumerate(trainer.workers):
        shape_in = (3, 32, 32) if k == 0 else trainer.output_shapes[k - 1]
        graph, _ = memory._profile_batch(worker, 16, shape_in, trainer.output_shapes[k], 10, list(releases[k]))
        assert abs(fitted[k].graph.at(16) - graph) <= 0.01 * graph
    assert Linear.fit({2: 100, 4: 180}).at(16) == 660


TOLERANCE = 0.01  # the batch-scaling error above; the schedule's counts are exact


def _methods_and_staleness_modes() -> list[tuple[str, dict]]:
    """Every method of the package, once per staleness mode where it has
    the option (plug-ins live outside the repository)."""
    cases = []
    for m in all_methods():
        if m.__module__.startswith("methods."):
            staleness = next((o for o in m.options if o.name == "staleness"), None)
            modes = staleness.choices if staleness else (None,)
            cases += [(m.name, {"staleness": mode} if mode else {}) for mode in modes]
    return cases


B = 24  # divisible by the 3 replicas dp makes of splits = 3


@pytest.mark.parametrize("method,options", _methods_and_staleness_modes())
def test_the_estimate_matches_the_measured_bytes(method, options):
    cfg = RunConfig(method=method, method_options=options, model=model_for(method), splits=3, dataset="synthetic",
                    batch_size=B, threads=1)
    trainer = build_run(cfg, dataset=synthetic_dataset(10, train=96, test=16))
    # The run's own window: the pipeline's fill twice over, and until every replay buffer is full.
    for t in range(trainer.memory.window):
        trainer.memory.watch(t)
        trainer.engine.run_iteration(t)
    measured = trainer.memory.record()
    for stage in estimate(cfg, (3, 32, 32), 10):
        m = measured[f"stage{stage.index}_memory_bytes"]
        assert abs(m - stage.peak_bytes(B)) <= TOLERANCE * m, (stage.index, m, stage.peak_bytes(B))


def test_staleness_modes_order_stage_memory():
    """replay keeps inputs only; stash adds a weight copy per batch to legacy's graphs."""
    peak = {mode: estimate(RunConfig(method="fdg", method_options={"staleness": mode}, model="tiny_resnet",
                                     splits=2), (3, 32, 32), 10)[0].peak_bytes(128)
            for mode in ("legacy", "stash", "replay")}
    assert peak["replay"] < peak["legacy"] < peak["stash"]


def test_every_run_records_stage_memory(cli, tmp_path):
    for method in ("bp", "fdg"):
        status, _, err = cli("run", "--method", method, *TINY, "--out", tmp_path / method)
        assert status == 0, err
    bp, fdg = (json.loads(next((tmp_path / m).glob("*/summary.json")).read_text()) for m in ("bp", "fdg"))
    for s in (bp, fdg):
        assert s["stage0_memory_bytes"] > 0 and s["stage1_memory_bytes"] > 0
        assert s["stage0_memory"]["held_peak"] > 0 and "stage0_cuda_peak_bytes" not in s
    # FDG's stage 0 holds two batches' graphs where BP's holds one; the state is the same.
    assert fdg["stage0_memory"]["held_peak"] == pytest.approx(2 * bp["stage0_memory"]["held_peak"], rel=0.01)
    assert fdg["stage0_memory"]["weights"] == bp["stage0_memory"]["weights"]


def test_the_monitor_measures_only_its_window(tiny_data):
    cfg = RunConfig(method="fdg", model="tiny_resnet", splits=2, dataset="synthetic", batch_size=16, threads=1)
    trainer = build_run(cfg, dataset=tiny_data)
    for t in range(trainer.memory.window + 2):
        trainer.memory.watch(t)
        trainer.engine.run_iteration(t)
        assert all(p.armed == (t < trainer.memory.window) for p in trainer.memory.probes)


def _tiny_limit(device):
    return 2**20  # 1 MiB free


def test_a_run_that_does_not_fit_is_refused_in_one_line(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", _tiny_limit)
    status, out, err = cli("run", "--method", "fdg", *TINY, "--out", tmp_path)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: fdg tiny_resnet K=2 batch 16")
    assert "needs about" in lines[0] and "0.0 GiB is available" in lines[0]
    assert "--ignore-memory-check" in lines[0] and "free" in lines[0]
    assert not list(tmp_path.glob("*"))  # nothing started
    # --force does not override it
    assert cli("run", "--method", "fdg", *TINY, "--out", tmp_path, "--force")[0] == 2


def test_the_refusal_names_what_would_fit(monkeypatch):
    cfg = RunConfig(method="fdg", model="tiny_resnet", splits=2, dataset="synthetic", batch_size=64)
    stages = estimate(cfg, (3, 32, 32), 10)
    replay = estimate(RunConfig(method="fdg", method_options={"staleness": "replay"}, model="tiny_resnet", splits=2,
                                batch_size=64), (3, 32, 32), 10)
    need = memory.OVERHEAD * sum(s.peak_bytes(64) for s in stages)
    need_replay = memory.OVERHEAD * sum(s.peak_bytes(64) for s in replay)
    assert need_replay < 0.9 * need
    limit = int((need_replay + need) / 2)  # replay fits, legacy does not
    with pytest.raises(UserError) as caught:
        memory.check_fits(cfg, (3, 32, 32), 10, available=lambda device: limit)
    message = str(caught.value)
    assert "--staleness replay" in message and "--batch-size 32" in message
    assert "2 machines" not in message  # the larger stage alone (plus a process) does not fit in the limit either
    memory.check_fits(cfg, (3, 32, 32), 10, available=lambda device: int(need) + 1)  # fits: no error


def test_ignore_memory_check_lets_it_through_under_the_same_name(cli, tmp_path, monkeypatch):
    status, _, err = cli("run", "--method", "fdg", *TINY, "--out", tmp_path / "plain")
    assert status == 0, err
    monkeypatch.setattr(memory, "available_bytes", _tiny_limit)
    status, _, err = cli("run", "--method", "fdg", *TINY, "--out", tmp_path / "ignored", "--ignore-memory-check")
    assert status == 0, err
    plain, ignored = (next((tmp_path / d).glob("*/config.json")) for d in ("plain", "ignored"))
    assert plain.parent.name == ignored.parent.name  # the flag is not part of the config or its hash
    assert "ignore" not in ignored.read_text()


def test_bench_memory_prints_measured_and_expected(cli):
    status, out, err = cli("bench", "memory", "--model", "tiny_resnet", "-K", "2", "--batch-size", "8",
                           "--threads", "1")
    assert status == 0, err
    rows = {line.split()[0] + ("" if line.split()[1][0].isdigit() else " " + line.split()[1]): line
            for line in out.splitlines()[4:]}
    assert {"bp", "fdg legacy", "fdg stash", "fdg replay", "ddg legacy", "ddg stash", "fr", "dgl", "dni"} <= set(rows)
    assert "= 1.00 x2" in rows["fdg legacy"] and "= 1.00 x1" in rows["bp"]


def test_bench_memory_takes_methods_with_options_and_counts_local_nets_and_replay_buffers(cli):
    # InfoPro's decoders and auxiliary nets, AugLocal's blocks and dgl-async's full buffers of M received
    # activations: the estimate equals the measurement (the same storages counted both ways, float32 CPU).
    status, out, err = cli("bench", "memory", "--model", "tiny_resnet", "-K", "3", "--batch-size", "8",
                           "--threads", "1", "--methods", "dgl,infopro,auglocal,dgl-async[buffer=2]")
    assert status == 0, err
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    rows = {line.split()[0]: line for line in lines[header + 1:]}
    assert set(rows) == {"dgl", "infopro", "auglocal", "dgl-async"}
    assert all(row.count("= 1.00 x1") == 3 for row in rows.values()), out

    def total(row):  # measured, summed over the stages (the last columns: measured / expected, one process)
        return float(row.split()[-4])

    # Stage 1 and 2 each keep 2 activations of their input: more than DGL, which keeps none.
    assert total(rows["dgl-async"]) > total(rows["dgl"])
    # One process running every local-learning stage holds one stage's graph at a time: less than the sum.
    assert all(float(row.split()[-1]) < total(row) for row in rows.values())


def test_bench_memory_rss_is_a_fresh_processs_growth_and_grows_with_the_batch(cli):
    """--rss: each row in its own process, the peak resident memory over the
    window less the resident memory before it. Real pages: it grows with
    the batch by at least what the saved storages grow by (measured here:
    13 MiB at batch 8, 53 at 64, against 2.8 and 21 MiB counted)."""
    counted, growth = {}, {}
    for batch in (8, 64):
        status, out, err = cli("bench", "memory", "--model", "tiny_resnet", "-K", "2", "--batch-size", str(batch),
                               "--threads", "1", "--methods", "bp", "--rss")
        assert status == 0, err
        row = next(line for line in out.splitlines() if line.startswith("bp ")).split()
        counted[batch], growth[batch] = float(row[-7]), float(row[-3])  # measured total; rss growth
    assert growth[8] > 0
    assert growth[64] - growth[8] >= counted[64] - counted[8]


def test_bench_memory_expected_at_a_larger_batch_is_what_that_batch_measures(cli):
    """--expected-at B: the fit read off at B, per stage and in all; measured
    at B directly, the stages hold that (to the printed 0.1 MiB: the fit is
    exact for these affine storages, test_linear_fit_predicts_a_larger_batch)."""
    def rows(*options):
        status, out, err = cli("bench", "memory", "--model", "tiny_resnet", "-K", "2", "--threads", "1",
                               "--methods", "bp,fdg", *options)
        assert status == 0, err
        return {line.split()[0]: line for line in out.splitlines() if line.split()[0] in ("bp", "fdg")}

    predicted, direct = rows("--batch-size", "8", "--expected-at", "48"), rows("--batch-size", "48")
    for method in ("bp", "fdg"):
        at = predicted[method].split("at 48:")[1].replace("/", " ").replace("=", " ").split()
        stages = [float(direct[method].split()[i]) for i in (1, 7)]  # each stage's measured MiB
        total = float(direct[method].split()[-4])
        assert [float(x) for x in at] == pytest.approx([*stages, total], abs=0.11), (predicted[method], direct[method])


def test_the_estimate_probes_dp_at_more_replicas_than_its_probe_batches():
    # The estimate's probe batches (2 and 4 images) are smaller than K=4
    # replicas' shards: dp's one-process replay must take the shards there are.
    (stage,) = estimate(RunConfig(method="dp", model="tiny_resnet", splits=4, dataset="synthetic", batch_size=128),
                        (3, 32, 32), 10)
    assert stage.peak_bytes(128) > stage.peak_bytes(64) > 0


@pytest.mark.parametrize("method,options", [("bp", {}), ("fdg", {}), ("dgl", {}), ("infopro", {}), ("auglocal", {}),
                                            ("dgl-async", {"buffer": 2}), ("gpipe", {"microbatches": 4}),
                                            ("2bw", {})])
def test_one_process_peak_equals_what_the_sequential_engine_holds_at_once(method, options):
    """The expected peak of one process running every stage against the sum,
    after every action, of what each stage's probe records it keeps (saved
    storages, inputs and outputs) and its state: BP holds every stage's graph
    at once, local learning one stage's."""
    cfg = RunConfig(method=method, method_options=options, model="tiny_resnet", splits=3, dataset="synthetic",
                    batch_size=8, epochs=4, threads=1)
    trainer = build_run(cfg, dataset=synthetic_dataset(10, train=64, test=16))
    totals = []

    def after(t, k, action):
        totals.append(sum(p.held_bytes() + sum(memory.state_bytes(p.worker).values())
                          for p in trainer.memory.probes))

    trainer.engine.observer = after
    for t in range(trainer.hold_span + 3 + memory.buffer_fill(trainer.workers, trainer.stage_indices)):
        trainer.memory.watch(t)
        trainer.engine.run_iteration(t)
    expected = memory.one_process_peak(estimate(cfg, (3, 32, 32), 10), trainer.method.schedule, 8)
    # The estimate is fitted on batches 2 and 4 and these nets' bytes are linear in the batch: equal but for
    # float rounding of the fit.
    assert max(totals) == pytest.approx(expected, rel=1e-6)
    # BP keeps every stage's graph until its backward: its one process needs the sum of the stages' peaks;
    # local learning frees each stage's graph before the next stage forwards: less than that sum.
    stages_sum = sum(s.peak_bytes(8) for s in estimate(cfg, (3, 32, 32), 10))
    if method in ("bp", "fdg", "gpipe", "2bw"):
        assert expected == pytest.approx(stages_sum, rel=1e-9)
    else:
        assert expected < stages_sum
