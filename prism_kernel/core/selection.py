"""Selection: from backend health to the set the kernel steers to.

Pure (no I/O, no clock, no kernel) and deterministic: the same input gives the
same, sorted output, so an unchanged state never causes a kernel write.

Rules, per address family (a listener can only reach its own family):
1. a healthy loopback backend (the node's own API server) wins: it is the
   fastest path and keeps working when the node's network does not;
2. otherwise every healthy backend in the lowest latency tier (a healthy
   backend whose tier is not known yet counts as in it);
3. when nothing is healthy, fail open to every known backend: an API server
   that the probes cannot see may still serve, and an empty set would turn a
   probe problem into an outage. An empty set is never produced while any
   backend is known.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from prism_kernel.core.model import Backend

Mode = Literal["loopback", "tier", "fail-open", "empty"]


@dataclass(frozen=True)
class Candidate:
    backend: Backend
    healthy: bool
    tier: int | None  # None before the first successful probe


@dataclass(frozen=True)
class Selection:
    backends: tuple[Backend, ...]
    mode: Mode
    tier: int | None = None


@dataclass(frozen=True)
class FullSelection:
    """The selection of every family, and the union the data path gets."""

    by_family: dict[int, Selection]

    @property
    def backends(self) -> tuple[Backend, ...]:
        return tuple(sorted(b for s in self.by_family.values() for b in s.backends))

    @property
    def fail_open_families(self) -> tuple[int, ...]:
        return tuple(f for f, s in self.by_family.items() if s.mode == "fail-open")

    @property
    def fail_open(self) -> bool:
        """Nothing healthy at all. (An address family can fail open on its own,
        e.g. an AAAA record on a node without IPv6 routes, while IPv4 serves
        fine: see fail_open_families.)"""
        return bool(self.by_family) and all(s.mode == "fail-open" for s in self.by_family.values())


def select_family(candidates: Sequence[Candidate]) -> Selection:
    """Select among candidates of one address family."""
    if not candidates:
        return Selection((), "empty")
    healthy = [c for c in candidates if c.healthy]
    if not healthy:
        return Selection(tuple(sorted({c.backend for c in candidates})), "fail-open")
    loopback = [c for c in healthy if c.backend.is_loopback]
    if loopback:
        return Selection(tuple(sorted({c.backend for c in loopback})), "loopback", _min_tier(loopback))
    # A healthy backend whose tier is not known yet (too few latency samples)
    # counts as in the best tier: healthy is known, slow is not.
    best = _min_tier(healthy)
    chosen = {c.backend for c in healthy if c.tier is None or c.tier == best}
    return Selection(tuple(sorted(chosen)), "tier", best)


def select(candidates: Iterable[Candidate], families: Iterable[int] = (4, 6)) -> FullSelection:
    """Select per family among `families` (those the data path can steer)."""
    wanted = set(families)
    groups: dict[int, list[Candidate]] = {}
    for c in candidates:
        if c.backend.family in wanted:
            groups.setdefault(c.backend.family, []).append(c)
    return FullSelection({fam: select_family(groups[fam]) for fam in sorted(groups)})


def _min_tier(cands: Sequence[Candidate]) -> int | None:
    """The best known tier, None when no candidate has one yet."""
    return min((c.tier for c in cands if c.tier is not None), default=None)
