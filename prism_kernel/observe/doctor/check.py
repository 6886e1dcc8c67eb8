"""One check of `prism-kernel doctor` and its verdicts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass
class Check:
    id: str
    verdict: str          # ok | warn | fail (final, after _settle)
    summary: str          # what was found
    action: str = ""      # what to do; empty when nothing is
    # Data paths that cannot run while this check is not ok. A check that is
    # not ok becomes `fail` only when no data path can run at all.
    needed_by: tuple[str, ...] = ()
    # Not ok stops `run` itself, whatever data path (a listener on the listen
    # address: run refuses with exit 2): always `fail`, and doctor exits 1.
    blocks_run: bool = False
    details: dict[str, Any] = field(default_factory=dict)


def one_line(text: str, limit: int = 400) -> str:
    """A reason that may span lines (a verifier log) as one line: its first
    line and its last telling line (the verifier's verdict)."""
    lines = [l.strip() for l in str(text).splitlines() if l.strip()]
    if not lines:
        return ""
    if len(lines) > 1:
        tail = [l for l in lines[1:] if not l.startswith(("processed ", ";"))]
        lines = [lines[0], "[...]", tail[-1]] if tail else [lines[0]]
    one = " ".join(lines)
    return one if len(one) <= limit else one[:limit - 3] + "..."

