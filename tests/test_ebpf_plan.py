"""The eBPF map plan (prism_kernel/core/ebpf_plan.py): pure, no root."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prism_kernel.core import ebpf_plan as plan
from prism_kernel.core.model import Backend
from prism_kernel.errors import DatapathError

A, B, C = (Backend.of(f"10.0.0.{i}", 6443) for i in (1, 2, 3))
X, Y = (Backend.of(f"fd00::{i}", 6443) for i in (1, 2))
POOL = [A, B, C, X, Y, Backend.of("10.0.0.1", 443), Backend.of("192.0.2.9", 6443)]


def test_first_set_goes_into_buffer_one_under_generation_one():
    ops = plan.plan_update(plan.Live(0), [C, X, A, A])
    assert ops == (
        plan.CreateCounter(A), plan.CreateCounter(C), plan.CreateCounter(X),
        plan.WriteSlot(1, 4, 0, 1, A), plan.WriteSlot(1, 4, 1, 1, C), plan.WriteSlot(1, 6, 0, 1, X),
        plan.WriteSet(1, 1, 2, 1),
        plan.Commit(1),
    )
    assert plan.live_after(plan.Live(0), ops) == plan.Live(1, (A, C), (X,))


def test_a_change_writes_the_other_buffer_and_cleans_up_after_the_commit():
    live = plan.Live(7, (A, B), (X,))
    ops = plan.plan_update(live, [B, C], counters={A, B, X}, outcomes=())
    assert ops == (
        plan.CreateCounter(C),
        plan.WriteSlot(0, 4, 0, 8, B), plan.WriteSlot(0, 4, 1, 8, C),
        plan.WriteSet(0, 8, 2, 0),
        plan.Commit(8),
        plan.DeleteCounter(A), plan.DeleteCounter(X),
    )


def test_an_unchanged_set_commits_nothing_and_only_repairs_counters():
    live = plan.Live(3, (A,), (X,))
    assert plan.plan_update(live, [X, A], counters={A, X}) == ()
    # a failure after an earlier commit left a counter behind and one missing
    ops = plan.plan_update(live, [A, X], counters={A, B})
    assert ops == (plan.CreateCounter(X), plan.DeleteCounter(B))
    assert plan.commit_index(ops) is None
    assert plan.live_after(live, ops) == live


def test_empty_set_is_a_commit_of_empty_counts():
    ops = plan.plan_update(plan.Live(1, (A,), ()), [], counters={A})
    assert ops == (plan.WriteSet(0, 2, 0, 0), plan.Commit(2), plan.DeleteCounter(A))


def test_outcome_entries_are_trimmed_only_when_the_map_fills():
    """pk_passive keeps cumulative counters; entries of backends outside the
    set go only when it is over 3/4 full."""
    others = [Backend.of(str(ipaddress.IPv4Address("10.1.0.0") + i), 6443) for i in range(6)]
    live = plan.Live(1, (A,), ())
    assert plan.plan_update(live, [A], {A}, others[:5] + [A], max_outcomes=8) == ()  # 6 of 8
    ops = plan.plan_update(live, [A], {A}, others + [A], max_outcomes=8)  # 7 of 8
    assert ops == tuple(plan.DeleteOutcomes(b) for b in sorted(others))


def test_refuses_what_the_kernel_cannot_hold_before_writing_anything():
    many = [Backend.of(str(ipaddress.IPv4Address("10.2.0.0") + i), 6443) for i in range(65)]
    with pytest.raises(DatapathError, match="at most 64"):
        plan.plan_update(plan.Live(0), many)
    assert len(plan.split_families(many[:64])[0]) == 64
    with pytest.raises(DatapathError, match="does not match"):
        plan.split_families([Backend(6, ipaddress.IPv4Address("10.0.0.1"), 6443)])
    with pytest.raises(DatapathError, match="port"):
        plan.split_families([Backend.of("10.0.0.1", 0)])


def test_slot_index_is_the_programs_layout():
    """PK_SLOT(buf, family, idx) in bpf/prism_sock.bpf.c."""
    seen = {plan.slot_index(b, f, i) for b in (0, 1) for f in (4, 6) for i in range(plan.MAX_BACKENDS)}
    assert seen == set(range(plan.SLOTS))
    assert plan.slot_index(1, 6, 3) == 1 * 128 + 64 + 3
    for bad in ((2, 4, 0), (0, 5, 0), (0, 4, 64), (0, 4, -1)):
        with pytest.raises(ValueError):
            plan.slot_index(*bad)


sets = st.lists(st.sampled_from(POOL), max_size=6)


@settings(max_examples=300, deadline=None)
@given(history=st.lists(sets, min_size=1, max_size=8), seq0=st.integers(0, 2**64 - 20))
def test_every_plan_keeps_the_protocols_rules(history, seq0):
    """Over any sequence of sets: nothing a connect can see is written before
    the commit except the buffer that is not live; the commit is the one
    generation step; after it, only clean-up; the kernel ends up publishing
    exactly the set asked for."""
    live = plan.Live(seq0)
    counters: set[Backend] = set()
    for wanted in history:
        ops = plan.plan_update(live, wanted, counters)
        at = plan.commit_index(ops)
        v4, v6 = plan.split_families(wanted)
        if (v4, v6) == (live.v4, live.v6):
            assert at is None
        else:
            assert [op for op in ops if isinstance(op, plan.Commit)] == [plan.Commit(live.seq + 1)]
            before, after = ops[:at], ops[at + 1:]
            for op in before:
                assert isinstance(op, plan.CreateCounter | plan.WriteSlot | plan.WriteSet)
                if isinstance(op, plan.WriteSlot | plan.WriteSet):
                    assert op.buf != live.buf and op.gen == live.seq + 1
            assert all(isinstance(op, plan.DeleteCounter | plan.DeleteOutcomes) for op in after)
            assert isinstance(ops[at - 1], plan.WriteSet)
        created = {op.backend for op in ops if isinstance(op, plan.CreateCounter)}
        deleted = {op.backend for op in ops if isinstance(op, plan.DeleteCounter)}
        assert created.isdisjoint(counters) and deleted <= counters
        counters = (counters | created) - deleted
        assert counters == set(wanted)
        live = plan.live_after(live, ops)
        assert (live.v4, live.v6) == (v4, v6)
