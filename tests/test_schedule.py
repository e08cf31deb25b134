import pytest

from fdgbench.method import all_methods, make_method
from fdgbench.schedule import Action, Op, ScheduleError, format_grid, stage_plan, validate

F, B, U = Op.FORWARD, Op.BACKWARD, Op.UPDATE


@pytest.mark.parametrize("method", [m.name for m in all_methods()])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 6])
def test_every_registered_schedule_validates(method, k):
    validate(make_method(method).schedule, k, 6 * k + 10)


def _fixed(*stages):
    return lambda num_stages, t: tuple(tuple(s) for s in stages)


@pytest.mark.parametrize("plan,message", [
    # Both stages wait for each other's message first.
    (_fixed([Action(Op.RECV_GRAD, 0), Action(F, 0), Action(Op.SEND_ACT, 0)],
            [Action(Op.RECV_ACT, 0), Action(F, 0), Action(B, 0), Action(Op.SEND_GRAD, 0)]), "deadlock"),
    # A receive of a message nobody sends.
    (_fixed([Action(F, 0)], [Action(Op.RECV_ACT, 0), Action(F, 0)]), "deadlock"),
    # Sent with latency 1, received with latency 0 in the same iteration.
    (_fixed([Action(F, 0), Action(Op.SEND_ACT, 0, 1)], [Action(Op.RECV_ACT, 0), Action(F, 0)]), "latency"),
    # A send before the compute that produces it.
    (_fixed([Action(Op.SEND_ACT, 0), Action(F, 0)], [Action(Op.RECV_ACT, 0), Action(F, 0)]), "before computing"),
    # Forward without receiving the input.
    (_fixed([Action(F, 0), Action(Op.SEND_ACT, 0)], [Action(F, 0), Action(Op.RECV_ACT, 0)]), "before receiving"),
    # A message sent and never received.
    (_fixed([Action(F, 0), Action(Op.SEND_ACT, 0)], []), "never received"),
])
def test_validator_rejects_broken_schedules(plan, message):
    with pytest.raises(ScheduleError, match=message):
        validate(plan, 2, 2)


def test_validator_rejects_backward_without_forward():
    with pytest.raises(ScheduleError, match="without a pending forward"):
        validate(_fixed([Action(B, 0), Action(U)]), 1, 1)
    with pytest.raises(ScheduleError, match="forwarded twice"):
        validate(_fixed([Action(F, 0)]), 1, 2)


def test_stage_plan_orders_fdg_backward_first_and_skips_negative_batches():
    assert [str(a) for a in stage_plan(1, 3, 4, 2, 1, 1, backward_first=True)] == \
        ["rG2'", "B2", "sG2'", "U", "rA4'", "F4", "sA4'"]
    assert [str(a) for a in stage_plan(0, 3, 1, -3, 1, 1, backward_first=True)] == ["F1", "sA1'"]
    assert [str(a) for a in stage_plan(2, 3, 3, 3, 1, 1, backward_first=True)] == ["rA3'", "F3", "B3", "sG3'", "U"]


def test_fdg_grid_matches_the_paper_figure():
    grid = format_grid(make_method("fdg").schedule, 3, 6)
    assert grid == "\n".join([
        "step | stage 0 | stage 1 | stage 2",
        "-----+---------+---------+--------",
        "   0 | F0      |         |",
        "   1 | F1      | F0      |",
        "   2 | F2      | F1      | F0 B0 U",
        "   3 | F3      | B0 U F2 | F1 B1 U",
        "   4 | B0 U F4 | B1 U F3 | F2 B2 U",
        "   5 | B1 U F5 | B2 U F4 | F3 B3 U",
    ])


def test_bp_grid_with_messages_shows_the_lockings():
    grid = format_grid(make_method("bp").schedule, 2, 1, messages=True)
    assert grid.splitlines()[-1] == "   0 | F0 sA0 rG0 B0 U | rA0 F0 B0 sG0 U"
