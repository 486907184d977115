"""Pipeline schedules as data: construction, validation, deadlock detection, simulated bubbles."""

import random

import meshc
import pytest
from meshc.schedules import (
    SCHEDULES,
    Action,
    Schedule,
    ScheduleError,
    build_schedule,
    format_table,
    simulate,
    validate,
)

pytestmark = pytest.mark.timeout(60)
UNIT = {"F": 1.0, "B": 2.0, "I": 1.0, "W": 1.0}
cost = lambda a: UNIT[a.op]


def _valid_config(name, p, v, m):
    """What the schedules promise to support; anything else must be rejected at validation."""
    if name == "interleaved-1f1b":
        return v >= 2 and m % p == 0
    return v == 1


def test_scheduleerror_is_exported_and_a_meshc_error():
    assert meshc.ScheduleError is ScheduleError and issubclass(ScheduleError, meshc.MeshcError)


def test_100_random_configurations_finish_or_fail_validation():
    rng = random.Random(5)
    outcomes = {"built": 0, "rejected": 0, "m<p built": 0}
    for _ in range(100):
        name = rng.choice(list(SCHEDULES))
        p, m = rng.randint(1, 8), rng.randint(1, 24)
        if name == "interleaved-1f1b":  # mostly valid draws, some invalid ones
            v, m = rng.choice([1, 2, 2, 3, 4]), rng.choice([m, p * rng.randint(1, 4)])
        else:
            v = rng.choice([1, 1, 1, 1, 2])
        if _valid_config(name, p, v, m):
            sched = build_schedule(name, p, m, v)  # must build: a ScheduleError here fails the test
            tl = simulate(sched, cost, p2p_time=rng.choice([0.0, 0.3]))
            assert len(tl.events) == sum(len(r) for r in sched.actions)
            _check_timeline(sched, tl, p2p=None)
            outcomes["built"] += 1
            outcomes["m<p built"] += m < p
        else:
            with pytest.raises(ScheduleError, match="virtual|multiple of pp"):
                build_schedule(name, p, m, v)
            outcomes["rejected"] += 1
    assert outcomes["built"] > 50 and outcomes["rejected"] > 10 and outcomes["m<p built"] > 5, outcomes


def _check_timeline(sched: Schedule, tl, p2p):
    end = {e.action: e.end for e in tl.events}
    by_rank = {}
    for e in tl.events:
        assert sched.stage_rank(e.action.stage) == e.rank
        for d in sched.dependencies(e.action):
            assert end[d] <= e.start + 1e-9, (e, d)
        by_rank.setdefault(e.rank, []).append(e)
    for r, evs in by_rank.items():
        assert [e.action for e in evs] == list(sched.actions[r])  # runs in the given order
        assert all(a.end <= b.start + 1e-9 for a, b in zip(evs, evs[1:]))  # one action at a time


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", [(4, 4), (4, 8), (4, 16), (2, 3), (8, 5), (3, 1)])
def test_gpipe_and_1f1b_bubble_is_the_textbook_formula(name, p, m):
    tl = simulate(build_schedule(name, p, m), cost)
    assert tl.bubble_overall == pytest.approx((p - 1) / (m + p - 1), rel=1e-9)
    assert all(b == pytest.approx((p - 1) / (m + p - 1)) for b in tl.bubble)
    assert tl.makespan == pytest.approx(3 * (m + p - 1))


@pytest.mark.parametrize("p,v,m", [(4, 2, 8), (4, 3, 8), (2, 2, 4), (8, 2, 16), (3, 4, 9)])
def test_interleaved_bubble_shrinks_by_virtual(p, v, m):
    # per virtual stage F=1, B=2: idle = (p-1)(F+B) while work = v*m*(F+B) -> Megatron's 1/v bubble
    tl = simulate(build_schedule("interleaved-1f1b", p, m, v), cost)
    assert tl.bubble_overall == pytest.approx((p - 1) / (v * m + p - 1))
    assert tl.bubble_overall < simulate(build_schedule("1f1b", p, m), cost).bubble_overall


@pytest.mark.parametrize("p,m", [(4, 4), (4, 8), (4, 16), (2, 8), (8, 16), (4, 2)])
def test_zb_h1_bubble_below_1f1b_with_same_peak_memory(p, m):
    zb = simulate(build_schedule("zb-h1", p, m), cost)
    ofob = simulate(build_schedule("1f1b", p, m), cost)  # B = I + W = 2
    assert zb.bubble_overall < ofob.bubble_overall
    if m >= p:  # the paper's ZB-H1 bubble: (p-1)(F+I-W) per rank
        assert zb.makespan == pytest.approx(3 * m + (p - 1))
    assert zb.peak_inflight == ofob.peak_inflight
    # deferred W's also hold activations: F-to-I in flight plus pending W's never exceed 1F1B's peak p
    for acts in build_schedule("zb-h1", p, m).actions:
        held = peak = 0
        for a in acts:
            held += {"F": 1, "W": -1}.get(a.op, 0)
            peak = max(peak, held)
        assert peak <= min(p, m)


@pytest.mark.parametrize("p,m", [(4, 8), (4, 2), (2, 5), (1, 3)])
def test_peak_inflight_1f1b_vs_gpipe(p, m):
    assert simulate(build_schedule("1f1b", p, m)).peak_inflight[0] == min(p, m)
    assert simulate(build_schedule("1f1b", p, m)).peak_inflight == tuple(min(p - r, m) for r in range(p))
    assert simulate(build_schedule("gpipe", p, m)).peak_inflight == (m,) * p


def test_forward_only_streams_and_keeps_no_activations():
    s = build_schedule("forward", 3, 4)
    assert not s.training and all(a.op == "F" for r in s.actions for a in r)
    tl = simulate(s, cost)
    assert tl.makespan == 4 + 3 - 1 and tl.peak_inflight == (0, 0, 0)


def test_p2p_time_delays_cross_rank_dependencies():
    s = build_schedule("1f1b", 4, 8)
    assert simulate(s, cost, p2p_time=0.5).makespan > simulate(s, cost).makespan
    _check_timeline(s, simulate(s, cost, p2p_time=0.5), p2p=0.5)


def test_interleaved_stage_placement_round_robin():
    s = build_schedule("interleaved-1f1b", 2, 4, virtual=2)
    assert s.num_stages == 4 and [s.stage_rank(i) for i in range(4)] == [0, 1, 0, 1]
    assert {a.stage for a in s.actions[1]} == {1, 3}


def test_deadlock_is_found_and_named():
    F, B = (lambda s, m: Action("F", s, m)), (lambda s, m: Action("B", s, m))
    bad = Schedule("1f1b", 2, 1, 2, ((F(0, 0), B(0, 0), F(0, 1), B(0, 1)),
                                    (F(1, 0), F(1, 1), B(1, 0), B(1, 1))))
    with pytest.raises(ScheduleError) as e:
        validate(bad)
    msg = str(e.value)
    assert "cannot finish" in msg and "rank 0's next action B0.0 waits for B1.0 from rank 1" in msg
    assert "rank 1's next action F1.1 waits for F0.1 from rank 0" in msg


@pytest.mark.parametrize("actions,match", [
    (((Action("F", 0, 0), Action("B", 0, 0)), (Action("F", 0, 0), Action("B", 1, 0))),
     "rank 1 runs F0.0, but stage 0 belongs to rank 0"),
    (((Action("F", 0, 0),), (Action("F", 1, 0), Action("B", 1, 0))),
     r"stage 0, micro-batch 0 has actions \['F'\]; each needs exactly B\+F or F\+I\+W"),
    (((Action("B", 0, 0), Action("F", 0, 0)), (Action("F", 1, 0), Action("B", 1, 0))),
     "rank 0 runs B0.0 before F0.0"),
    (((Action("F", 0, 0), Action("B", 0, 3)), (Action("F", 1, 0), Action("B", 1, 0))),
     "micro-batch in 0..0"),
])
def test_malformed_schedules_are_rejected(actions, match):
    with pytest.raises(ScheduleError, match=match):
        validate(Schedule("gpipe", 2, 1, 1, actions))


@pytest.mark.parametrize("args,match", [
    (("zigzag", 2, 4), "unknown schedule 'zigzag'; choose one of: forward, gpipe"),
    (("1f1b", 0, 4), "pp must be a positive integer"),
    (("gpipe", 2, 4, 2), "virtual=2 is only for interleaved-1f1b"),
    (("interleaved-1f1b", 4, 6, 2), "multiple of pp=4; got 6: use 4, 8, 12"),
    (("interleaved-1f1b", 4, 8, 1), "needs virtual >= 2"),
])
def test_bad_configurations_say_what_to_change(args, match):
    with pytest.raises(ScheduleError, match=match):
        build_schedule(*args)


def test_format_table_shows_every_action_and_the_summary():
    s = build_schedule("1f1b", 2, 3)
    out = format_table(s)
    for acts in s.actions:
        for a in acts:
            assert str(a) in out
    assert "bubble" in out and "r0 2" in out.splitlines()[-2] and "makespan 12" in out
