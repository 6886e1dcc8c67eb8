"""The run-time limit on backends per address family.

The configuration holds at most MAX_BACKENDS_PER_FAMILY literal addresses
per family, but a DNS name can resolve to more and discovery can name more,
and the eBPF maps have that many slots per family. `FamilyLimit` keeps the
first MAX_BACKENDS_PER_FAMILY addresses of each family in the order it is
given (the daemon gives the static endpoints first, in their configured
order, a name's addresses sorted, then the discovered ones sorted), drops
the rest and says so: one `endpoints_truncated` line per family each time
what it drops changes, never a failure.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prism_kernel.core.model import Backend
from prism_kernel.sources.endpoints import MAX_BACKENDS_PER_FAMILY, EndpointSpec

# How many dropped addresses a log line names (the count is always whole).
_NAMED = 8


class FamilyLimit:
    def __init__(self, log: Any, limit: int = MAX_BACKENDS_PER_FAMILY):
        self.log = log
        self.limit = limit
        self.dropped: dict[int, tuple[Backend, ...]] = {4: (), 6: ()}  # per family, at the last apply()

    def apply(self, resolved: Iterable[tuple[EndpointSpec, list[Backend]]]
              ) -> list[tuple[EndpointSpec, list[Backend]]]:
        """Each spec with the backends of it that are within the limit, in
        the order given. An address given by two specs counts once."""
        kept: dict[int, set[Backend]] = {4: set(), 6: set()}
        dropped: dict[int, dict[Backend, None]] = {4: {}, 6: {}}
        out = []
        for spec, backends in resolved:
            mine = []
            for b in backends:
                family = kept[b.family]
                if b not in family and len(family) >= self.limit:
                    dropped[b.family][b] = None
                    continue
                family.add(b)
                mine.append(b)
            out.append((spec, mine))
        for f in (4, 6):
            now = tuple(dropped[f])
            if now != self.dropped[f]:
                self.dropped[f] = now
                self.log.warn("endpoints_truncated", family=f"ipv{f}", limit=self.limit, kept=len(kept[f]),
                              dropped=len(now),
                              dropped_addresses=",".join(map(str, now[:_NAMED])) + (",..." if len(now) > _NAMED else ""),
                              reason=f"at most {self.limit} IPv{f} backends fit the data path; static endpoints "
                                     "first, then discovered ones, in address order" if now
                                     else "every address fits again")
        return out
