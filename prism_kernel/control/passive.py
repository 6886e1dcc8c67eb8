"""The kernel's passive counters turned into failures to confirm.

The data path counts, per backend, what happened to steered connects
(refused, SYN timed out; eBPF: a sock_ops program, nftables: rules). The
counts are cumulative since the data path was installed; what matters is
what is new since the last read. Pure: the writer reads the counts, the
event loop feeds them here and confirms what comes out (targets.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from prism_kernel.core.model import Backend
from prism_kernel.datapath.base import PassiveCounts


@dataclass(frozen=True)
class NewFailure:
    backend: Backend
    saw: str  # what the kernel saw, as the confirmation's log lines name it
    refused: int  # new since the last read
    syn_timeouts: int


class PassiveFeedback:
    """Differences between successive reads of one data path's counters."""

    def __init__(self) -> None:
        self._seen: dict[Backend, PassiveCounts] = {}
        self._primed = False

    def reset(self) -> None:
        """A new data path (reload, reinstall): its counters start afresh,
        and its first read is the new baseline."""
        self._seen.clear()
        self._primed = False

    def new_failures(self, counts: Mapping[Backend, PassiveCounts]) -> list[NewFailure]:
        # The first read (even an empty one) is the baseline: counts from
        # before this daemon are not news. A backend that appears after it
        # is new in full.
        primed, self._primed = self._primed, True
        out = []
        for b, c in counts.items():
            prev = self._seen.get(b)
            self._seen[b] = c
            if prev is None:
                if not primed:
                    continue
                prev = PassiveCounts()
            refused, timeouts = c.refused - prev.refused, c.syn_timeouts - prev.syn_timeouts
            if refused > 0 or timeouts > 0:
                out.append(NewFailure(b, "kernel: refused" if refused > 0 else "kernel: SYN timeout",
                                      max(0, refused), max(0, timeouts)))
        return out
