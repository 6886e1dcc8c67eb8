"""How often the kernel's reports may start a confirmation of one backend.

A steered connect whose SYN never arrives is reported by the kernel
(pk_passive syn_timeouts) and confirmed by the daemon with a fresh handshake.
Any local user can make such connects (IP_TTL=1 towards a routed backend):
without a limit one process starts a confirmation every 50 ms poll. The rule (docs/design/confirm-limit.md):

* a backend's first report is confirmed at once;
* a confirmation that finds the backend alive opens a spacing during which
  further reports start nothing: FIRST_SPACING_S, doubling with every
  confirmation in a row that finds it alive, at most MAX_SPACING_S;
* a quiet spell (no confirmation for QUIET_S after the spacing ended)
  starts the doubling again from FIRST_SPACING_S;
* a real failure (a confirmation that finds it dead, the backend going down
  by its scheduled probes) forgets all of it: the next report is confirmed
  at once again.

A confirmation that finds the backend dead is never delayed: the result is
applied as it comes, and only the start of kernel-report confirmations is
gated (the daemon's own scheduled probes confirm a fatal-looking failure at
once, limit or not). Pure: the caller passes the clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from prism_kernel.core.model import Backend

FIRST_SPACING_S = 1.0
MAX_SPACING_S = 8.0
QUIET_S = 60.0
LOG_EVERY_S = 60.0  # confirm_rate_limited: at most one line per backend this often


@dataclass
class _Spacing:
    spacing: float  # the last spacing opened, seconds
    not_before: float  # no kernel-report confirmation before this (the caller's clock)
    logged_at: float | None = None  # when confirm_rate_limited was last logged


class ConfirmLimit:
    """Per backend: when the kernel's next report may start a confirmation."""

    def __init__(self, first: float = FIRST_SPACING_S, most: float = MAX_SPACING_S,
                 quiet: float = QUIET_S, log_every: float = LOG_EVERY_S):
        self.first = first
        self.most = most
        self.quiet = quiet
        self.log_every = log_every
        self._by_backend: dict[Backend, _Spacing] = {}

    def allows(self, backend: Backend, now: float) -> bool:
        s = self._by_backend.get(backend)
        return s is None or now >= s.not_before

    def should_log(self, backend: Backend, now: float) -> bool:
        """A refused report is worth a log line: the first, then one per
        `log_every` (marks it logged when it says yes)."""
        s = self._by_backend.get(backend)
        if s is None:
            return False
        if s.logged_at is not None and now - s.logged_at < self.log_every:
            return False
        s.logged_at = now
        return True

    def found_alive(self, backend: Backend, now: float) -> float:
        """A confirmation found the backend alive: open the next spacing
        (returned, seconds)."""
        s = self._by_backend.get(backend)
        if s is None or now - s.not_before >= self.quiet:
            logged_at = None if s is None else s.logged_at
            s = self._by_backend[backend] = _Spacing(self.first, now + self.first, logged_at)
        else:
            s.spacing = min(s.spacing * 2, self.most)
            s.not_before = now + s.spacing
        return s.spacing

    def failed(self, backend: Backend) -> None:
        """A real failure: the next report is confirmed at once."""
        self._by_backend.pop(backend, None)

    def spacing(self, backend: Backend) -> float | None:
        s = self._by_backend.get(backend)
        return None if s is None else s.spacing

    def keep_only(self, backends) -> None:
        """Backends no longer known take their state with them."""
        keep = set(backends)
        for b in [b for b in self._by_backend if b not in keep]:
            del self._by_backend[b]
