"""The initial SYN RTO of steered connects, the pure parts: the rule
(prism_kernel/core/rto.py), the plan's slots (core/ebpf_plan.py) and the
tick rate parsing (datapath/ebpf/jiffies.py). No root."""

from __future__ import annotations

import pytest

from prism_kernel.core import ebpf_plan as plan
from prism_kernel.core import rto
from prism_kernel.core.model import Backend
from prism_kernel.datapath.ebpf.jiffies import hz_from_jiffy_us
from prism_kernel.errors import DatapathError

A, B = Backend.of("10.0.0.1", 6443), Backend.of("10.0.0.2", 6443)
X = Backend.of("fd00::1", 6443)


@pytest.mark.parametrize(("rtt_s", "ms"), [
    (0.0004, 100),   # a local API server: the floor
    (0.0, 100),
    (0.0166, 100),   # 3 x 16.6 + 50 = 99.8 -> 100
    (0.02, 110),
    (0.05, 200),     # 3 x 50 + 50 = 200
    (0.08, 290),     # a WAN endpoint at 80 ms
    (0.1, 350),
    (0.3166, 1000),  # 3 x 316.6 + 50 = 999.8 -> 1000
    (0.5, 1000),     # the ceiling: never above the kernel default
    (3.0, 1000),
])
def test_rule(rtt_s, ms):
    assert rto.initial_syn_rto_ms(rtt_s) == ms


@pytest.mark.parametrize("rtt_s", [None, -0.1, float("nan"), float("inf")])
def test_no_known_rtt_is_the_kernel_default(rtt_s):
    assert rto.initial_syn_rto_ms(rtt_s) is None


def test_never_under_the_floor_nor_over_the_default():
    for us in range(0, 2_000_000, 1_337):
        ms = rto.initial_syn_rto_ms(us / 1e6)
        assert rto.FLOOR_MS <= ms <= rto.CEILING_MS
        assert ms >= 3 * us / 1000 or ms == rto.CEILING_MS  # far above the RTT where it can be


def test_by_backend_takes_the_worst_recent_sample():
    got = rto.syn_rto_ms_by_backend({A: [0.01, 0.08, 0.02], B: [None, 0.0003], X: [None], Backend.of("10.0.0.9", 1): []})
    assert got == {A: 290, B: 100}


@pytest.mark.parametrize(("syn_rto_ms", "confirm_ms"), [(100, 200), (110, 200), (200, 200), (290, 290), (1000, 1000)])
def test_the_confirmation_waits_at_least_tcp_rto_min(syn_rto_ms, confirm_ms):
    """The SYN timer's early firing costs a suspect mark; the confirmation's
    costs the backend: its connect never waits less than 200 ms."""
    assert rto.confirm_connect_ms(syn_rto_ms) == confirm_ms


@pytest.mark.parametrize(("ms", "hz", "jiffies"), [
    (300, 250, 75), (290, 250, 73), (200, 100, 20), (201, 100, 21), (290, 300, 87), (350, 1000, 350),
    (1000, 250, 250),
])
def test_ms_to_jiffies_rounds_up(ms, hz, jiffies):
    assert rto.ms_to_jiffies(ms, hz) == jiffies


@pytest.mark.parametrize(("sec", "usec", "hz"), [
    (0, 4000, 250), (0, 10000, 100), (0, 3333, 300), (0, 1000, 1000), (0, 976, 1024),
    (0, 0, None), (1, 0, None), (0, 4001, None), (0, 1_000_000, None),
])
def test_hz_from_one_jiffy(sec, usec, hz):
    assert hz_from_jiffy_us(sec, usec) == hz


def test_rto_goes_into_the_slots_and_live():
    ops = plan.plan_update(plan.Live(0), [A, B, X], syn_rto={A: 73, X: 50})
    slots = [op for op in ops if isinstance(op, plan.WriteSlot)]
    assert [(op.backend, op.syn_rto) for op in slots] == [(A, 73), (B, 0), (X, 50)]
    assert plan.live_after(plan.Live(0), ops) == plan.Live(1, (A, B), (X,), ((A, 73), (X, 50)))


def test_a_change_of_rto_alone_is_a_new_generation():
    live = plan.Live(4, (A, B), (), ((A, 73),))
    assert plan.plan_update(live, [A, B], {A, B}, syn_rto={A: 73}) == ()
    ops = plan.plan_update(live, [A, B], {A, B}, syn_rto={A: 50, B: 60})
    assert ops == (plan.WriteSlot(1, 4, 0, 5, A, 50), plan.WriteSlot(1, 4, 1, 5, B, 60),
                   plan.WriteSet(1, 5, 2, 0), plan.Commit(5))
    # taken away again: the kernel default, also a new generation
    ops = plan.plan_update(live, [A, B], {A, B})
    assert plan.live_after(live, ops) == plan.Live(5, (A, B), ())


def test_rto_of_a_backend_outside_the_set_is_ignored():
    live = plan.Live(4, (A,), ())
    assert plan.plan_update(live, [A], {A}, syn_rto={B: 60}) == ()


@pytest.mark.parametrize("bad", [-1, plan.MAX_SYN_RTO + 1])
def test_rto_out_of_range_is_refused_before_anything_is_planned(bad):
    with pytest.raises(DatapathError):
        plan.plan_update(plan.Live(0), [A], syn_rto={A: bad})
