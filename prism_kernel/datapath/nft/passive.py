"""The kernel's count of steered connects per backend (refused, answered,
SYN sent again), as the daemon polls it every 100 ms: one `list set` of the
set `outcomes` per poll, not a listing of the whole table (which grows with
the square of the backend count: N pick chains of N + 1 rules)."""

from __future__ import annotations

from prism_kernel.core.model import Backend
from prism_kernel.core.nft_plan import FAMILY, OUTCOMES_SET, Outcomes, parse_outcomes
from prism_kernel.datapath.base import PassiveCounts
from prism_kernel.datapath.nft.transport import Nft


def as_passive(outcomes: dict[Backend, Outcomes]) -> dict[Backend, PassiveCounts]:
    return {b: PassiveCounts(refused=o.refused, syn_timeouts=o.syn_timeouts, established=o.established)
            for b, o in outcomes.items()}


def read(nft: Nft, table: str) -> dict[Backend, PassiveCounts]:
    """Cumulative while the table lives; a backend appears at its first
    outcome and keeps its counts after it leaves the set. {} when there is
    no table of the current layout (no such set)."""
    objs = nft.list({"set": {"family": FAMILY, "table": table, "name": OUTCOMES_SET}})
    for obj in objs or []:
        body = obj.get("set")
        if isinstance(body, dict) and body.get("name") == OUTCOMES_SET:
            return as_passive(parse_outcomes(body))
    return {}
