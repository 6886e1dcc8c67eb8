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
LO2 = Backend.of("127.0.0.2", 6443)
V6 = Backend.of("2001:2::2", 6443)
V6B = Backend.of("2001:2::3", 6443)
V6LO = Backend.of("::1", 6443)


def cand(b, healthy, tier=0):
    return Candidate(b, healthy, tier)


def expected(cands):
    """The rules of prism_kernel.core.selection for one family, written out
    independently: (backends, mode, tier)."""
    if not cands:
        return set(), "empty", None
    healthy = [c for c in cands if c.healthy]
    if not healthy:
        return {c.backend for c in cands}, "fail-open", None
    loopback = [c for c in healthy if c.backend.is_loopback]
    if loopback:
        tiers = [c.tier for c in loopback if c.tier is not None]
        return {c.backend for c in loopback}, "loopback", min(tiers) if tiers else None
    tiers = [c.tier for c in healthy if c.tier is not None]
    best = min(tiers) if tiers else None
    return {c.backend for c in healthy if c.tier is None or c.tier == best}, "tier", best


def check_family(s, cands):
    """`s` (a Selection) is what the rules give for `cands`, in sorted order."""
    backends, mode, tier = expected(cands)
    assert (set(s.backends), s.mode, s.tier) == (backends, mode, tier), cands
    assert list(s.backends) == sorted(s.backends) and len(s.backends) == len(backends)


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
    assert results == {(A, B)}


def test_exhaustive_small_world():
    """Every combination of health and tier for five backends (two loopback)."""
    backends = [A, B, C, LO, LO2]
    modes = set()
    for healths in itertools.product([False, True], repeat=len(backends)):
        for tiers in itertools.product([None, 0, 1, 2], repeat=len(backends)):
            cands = [Candidate(b, h, t) for b, h, t in zip(backends, healths, tiers)]
            s = select_family(cands)
            assert s.backends, "never an empty set while backends are known"
            check_family(s, cands)
            modes.add(s.mode)
    assert modes == {"loopback", "tier", "fail-open"}  # the world reaches every rule


addresses = st.sampled_from([A, B, C, LO, LO2, V6, V6B, V6LO])


@given(st.dictionaries(addresses, st.tuples(st.booleans(), st.one_of(st.none(), st.integers(0, 4))), min_size=1))
def test_properties(world):
    cands = [Candidate(b, h, t) for b, (h, t) in world.items()]
    sel = select(cands)
    assert set(sel.by_family) == {b.family for b in world}
    for fam, s in sel.by_family.items():
        fam_cands = [c for c in cands if c.backend.family == fam]
        assert s.backends, "a known family never gets an empty set"
        check_family(s, fam_cands)
    assert sel.backends == tuple(sorted(b for s in sel.by_family.values() for b in s.backends))
    assert sel.fail_open == all(not h for h, _ in world.values())
    assert select(list(reversed(cands))).backends == sel.backends
