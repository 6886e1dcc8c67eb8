"""Selection is pure: checked exhaustively over small worlds and by property."""

import itertools

from hypothesis import given
from hypothesis import strategies as st

from prism_kernel.core.model import Backend
from prism_kernel.core.selection import Candidate, select, select_family

A = Backend.of("198.18.1.2", 6443)
B = Backend.of("198.18.2.2", 6443)
C = Backend.of("198.18.3.2", 6443)
LO = Backend.of("127.0.0.1", 6443)
V6 = Backend.of("2001:2::2", 6443)
V6B = Backend.of("2001:2::3", 6443)


def cand(b, healthy, tier=0):
    return Candidate(b, healthy, tier if healthy else tier)


def test_empty_input_gives_empty_selection():
    assert select_family([]).backends == ()
    assert select([]).backends == ()


def test_all_healthy_same_tier_selects_all_sorted():
    s = select_family([cand(C, True), cand(A, True), cand(B, True)])
    assert s.backends == (A, B, C)
    assert s.mode == "tier" and s.tier == 0


def test_lowest_tier_wins():
    s = select_family([cand(A, True, 2), cand(B, True, 1), cand(C, True, 1)])
    assert s.backends == (B, C)
    assert s.tier == 1


def test_unhealthy_fast_backend_is_ignored():
    s = select_family([cand(A, False, 0), cand(B, True, 3)])
    assert s.backends == (B,)


def test_healthy_loopback_is_preferred_even_when_slower():
    s = select_family([cand(A, True, 0), cand(LO, True, 2)])
    assert s.backends == (LO,) and s.mode == "loopback"


def test_unhealthy_loopback_is_not_preferred():
    s = select_family([cand(A, True, 0), cand(LO, False, 0)])
    assert s.backends == (A,)


def test_nothing_healthy_fails_open_to_everything():
    s = select_family([cand(A, False), cand(B, False), cand(LO, False)])
    assert s.mode == "fail-open"
    assert s.backends == tuple(sorted([A, B, LO]))


def test_healthy_backend_without_a_tier_yet_counts_as_best_tier():
    s = select_family([Candidate(A, True, None), Candidate(B, True, 3), Candidate(C, True, 4)])
    assert s.backends == (A, B)
    assert select_family([Candidate(A, True, None), Candidate(B, True, None)]).backends == (A, B)


def test_families_are_selected_separately():
    sel = select([cand(A, True, 0), cand(B, True, 1), cand(V6, False), cand(V6B, False)])
    assert sel.by_family[4].backends == (A,)
    assert sel.by_family[6].mode == "fail-open"
    assert sel.backends == (A, V6, V6B)
    assert sel.fail_open_families == (6,)
    assert not sel.fail_open  # IPv4 serves: the node is not failing open


def test_fail_open_means_nothing_healthy_in_any_family():
    sel = select([cand(A, False), cand(V6, False)])
    assert sel.fail_open and sel.fail_open_families == (4, 6)


def test_families_filter_drops_unsteerable_family():
    sel = select([cand(A, True), cand(V6, True)], families={4})
    assert sel.backends == (A,)
    assert 6 not in sel.by_family


def test_input_order_does_not_matter():
    cands = [cand(A, True, 1), cand(B, True, 1), cand(C, False, 0), cand(LO, False, 1)]
    results = {select(p).backends for p in itertools.permutations(cands)}
    assert len(results) == 1


def test_exhaustive_small_world():
    """Every combination of health and tier for four backends (one loopback)."""
    backends = [A, B, C, LO]
    for healths in itertools.product([False, True], repeat=4):
        for tiers in itertools.product([None, 0, 1, 2], repeat=4):
            cands = [Candidate(b, h, t) for b, h, t in zip(backends, healths, tiers)]
            s = select_family(cands)
            chosen = set(s.backends)
            assert chosen, "never an empty set while backends are known"
            assert list(s.backends) == sorted(s.backends)
            healthy = {b for b, h in zip(backends, healths) if h}
            if not healthy:
                assert chosen == set(backends) and s.mode == "fail-open"
                continue
            assert chosen <= healthy, "only healthy backends while any is healthy"
            if LO in healthy:
                assert chosen == {LO}
                continue
            known = [t for b, h, t in zip(backends, healths, tiers) if h and t is not None]
            best = min(known) if known else None
            assert chosen == {b for b, h, t in zip(backends, healths, tiers) if h and (t is None or t == best)}


addresses = st.sampled_from([A, B, C, LO, V6, V6B])


@given(st.dictionaries(addresses, st.tuples(st.booleans(), st.one_of(st.none(), st.integers(0, 4))), min_size=1))
def test_properties(world):
    cands = [Candidate(b, h, t) for b, (h, t) in world.items()]
    sel = select(cands)
    for fam, s in sel.by_family.items():
        fam_backends = {b for b in world if b.family == fam}
        assert s.backends, "a known family never gets an empty set"
        assert set(s.backends) <= fam_backends
        healthy = {b for b in fam_backends if world[b][0]}
        if healthy:
            assert set(s.backends) <= healthy
        else:
            assert set(s.backends) == fam_backends
    assert select(list(reversed(cands))).backends == sel.backends
