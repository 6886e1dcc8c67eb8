"""The nftables data path: DNAT of 127.0.0.1:<listen_port> onto the backend set.

One `ip` table per instance (instance "prism-kernel" -> table `prism_kernel`).
What it holds and every rule: nft/README.md; the choices behind it:
docs/design/nft-datapath.md. This class executes the pure plans of
prism_kernel.core.nft_plan:

- every write is one libnftables batch, one nf_tables transaction: a batch
  the kernel rejects changes nothing;
- nothing is written when the kernel already holds the wanted state (the
  table is read and compared first);
- the kernel state outlives the process: install() adopts a current table
  without writing it, and replaces an older or damaged one in one
  transaction, keeping the backends it steered to;
- IPv4 only: IPv6 backends are ignored (logged once), there is no IPv6
  route_localnet to DNAT a connect from ::1 off the host.

Its callers may be several threads (the daemon's writer, a metrics scrape):
each libnftables call holds the data path's lock (transport.Nft).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import ClassVar

from prism_kernel.core.model import Backend
from prism_kernel.core.nft_plan import (
    FAMILY,
    STEER_CHAIN,
    Plan,
    Planner,
    TableState,
    parse_table,
    steerable,
    table_name,
)
from prism_kernel.datapath import sysctl
from prism_kernel.datapath.base import (
    BackendCounters,
    Datapath,
    DatapathSettings,
    KernelState,
    PassiveCounts,
)
from prism_kernel.datapath.nft import connections, hostsettings, passive
from prism_kernel.datapath.nft.hostsettings import ROUTE_LOCALNET, TCP_TIMESTAMPS
from prism_kernel.datapath.nft.transport import (
    NAME,
    TEMPLATE_PATH,
    Nft,
    is_prism_table,
    new_nft,
    run,
    table_names,
    template,
)
from prism_kernel.errors import DatapathError, DatapathUnavailable

log = logging.getLogger("prism_kernel.datapath.nft")

# Names other modules import from here (datapath.installed(), tests, bench).
__all__ = ["NftablesDatapath", "table_name", "template", "TEMPLATE_PATH", "FAMILY",
           "ROUTE_LOCALNET", "TCP_TIMESTAMPS", "_new_nft", "_table_names"]
_new_nft, _table_names = new_nft, table_names

_COUNTERS_HELP = ("connections: new connections steered to the backend since it entered the set; "
                  "refused / established: steered connects the backend answered with RST / SYN-ACK "
                  "since the table was created; syn_timeouts: SYNs of steered connects sent again "
                  "(no answer within the retransmission timeout)")


class NftablesDatapath(Datapath):
    name = NAME
    # IPv4 only (no route_localnet for IPv6): the daemon selects, and
    # datapath.decide checks the endpoints, among these families only.
    families: ClassVar[frozenset[int]] = frozenset({4})
    # False reproduces the ruleset before the tcp_timestamps fix, for the
    # benchmark's evidence runs (bench/holder.py); never for production.
    fix_tcp_timestamps: ClassVar[bool] = True

    def __init__(self, settings: DatapathSettings):
        super().__init__(settings)
        self.table = table_name(settings.instance)
        self.plan = Planner(template(), self.table, settings.listen_port)
        self._nft = Nft()
        # install/apply read, plan and write as one step (the daemon has one
        # writer; this keeps a second one, e.g. a test, from interleaving).
        self._write = threading.Lock()
        self._warned: set[str] = set()

    @classmethod
    def check_available(cls, settings: DatapathSettings) -> None:
        nft = new_nft()
        try:
            tpl = template()
        except DatapathError as e:
            raise DatapathUnavailable(NAME, str(e)) from e
        why = hostsettings.check_writable()
        if why:
            raise DatapathUnavailable(NAME, why)
        rc, _, err = run(nft, [{"list": {"tables": {"family": FAMILY}}}])
        if rc != 0:
            raise DatapathUnavailable(NAME, f"nft does not work here: {err.strip()}")
        # The kernel validates the whole ruleset (NAT, numgen, masquerade,
        # conntrack expressions) in a dry run: sent, checked, never committed.
        probe = Planner(tpl, table_name(f"{settings.instance}-probe"), settings.listen_port)
        nft.set_dry_run(True)
        try:
            rc, _, err = run(nft, probe.create((Backend.of("192.0.2.1", 6443),)))
        finally:
            nft.set_dry_run(False)
        if rc != 0:
            raise DatapathUnavailable(
                NAME, f"kernel rejects the ruleset (nf_tables NAT/numgen/conntrack missing?): {err.strip()}")

    # -- helpers -----------------------------------------------------------

    def _wanted(self, backends: Sequence[Backend]) -> tuple[Backend, ...]:
        v4, v6 = steerable(backends, self.settings.listen_port)
        key = "v6:" + ",".join(map(str, v6))
        if v6 and key not in self._warned:
            self._warned.add(key)
            log.warning("nftables data path is IPv4-only: ignoring IPv6 backend(s) %s (IPv6 has "
                        "no route_localnet: DNAT from ::1 cannot leave the host)", ", ".join(map(str, v6)))
        return v4

    def _observe(self) -> TableState | None:
        objs = self._nft.list({"table": {"family": FAMILY, "name": self.table}})
        return None if objs is None else parse_table(objs)

    def _ensure_sysctls(self) -> None:
        # Before the first rule: a DNAT to a remote backend without
        # route_localnet is dropped as martian.
        hostsettings.ensure(self.settings, self.fix_tcp_timestamps and self.settings.nft_stable_tcp_timestamps,
                            self._warned)

    def _execute(self, plan: Plan, what: str) -> None:
        if plan.commands:
            self._nft.commit(plan.commands, what)

    # -- the interface -----------------------------------------------------

    def install(self, initial: Sequence[Backend]) -> bool:
        """Create the table, or adopt the one an earlier daemon left. True
        when a table existed (adopted as is, or replaced keeping the backends
        it steered to); `initial` is then not written."""
        wanted = self._wanted(initial)
        with self._write:
            self._ensure_sysctls()
            plan = self.plan.install(self._observe(), wanted)
            self._execute(plan, "install" if plan.action == "create" else "table upgrade")
        if plan.action == "create":
            log.info("installed nft table %s %s", FAMILY, self.table)
        elif plan.action == "adopt":
            log.info("adopted nft table %s %s (%d backends)", FAMILY, self.table, len(plan.backends))
        else:
            log.info("replaced nft table %s %s in one transaction: %s", FAMILY, self.table,
                     "; ".join(plan.problems))
        return plan.action != "create"

    def apply(self, backends: Sequence[Backend]) -> bool:
        wanted = self._wanted(backends)
        with self._write:
            self._ensure_sysctls()
            plan = self.plan.apply(self._observe(), wanted)
            self._execute(plan, "backend update" if plan.action == "update" else "re-install")
        if plan.action in ("create", "replace"):
            log.warning("nft table %s %s was %s; re-created", FAMILY, self.table,
                        "missing" if plan.action == "create" else "damaged: " + "; ".join(plan.problems))
        return plan.action != "nothing"

    def read_state(self) -> KernelState:
        st = self._observe()
        base = {"table": self.table, "family": FAMILY, **hostsettings.current()}
        if st is None:
            return KernelState(datapath=self.name, installed=False, details=base)
        problems = self.plan.problems(st)
        outcomes = passive.as_passive(st.outcomes)
        counters = {b: BackendCounters(connections=n, extra={
                        "refused": outcomes.get(b, PassiveCounts()).refused,
                        "syn_timeouts": outcomes.get(b, PassiveCounts()).syn_timeouts,
                        "established": outcomes.get(b, PassiveCounts()).established})
                    for b, n in st.connections.items()}
        return KernelState(
            datapath=self.name,
            installed=True,
            backends=st.backends,
            counters=counters,
            details={
                **base,
                "slots": [str(b) for b in st.slot_order or ()],
                "handles": {STEER_CHAIN: [r.get("handle") for r in st.rules.get(STEER_CHAIN, [])]},
                "current_layout": not problems,
                "problems": problems,
                "marker": st.marker,
                "cve_2020_8558_drops": st.cve_drops,
                # Backends that refused (or did not answer) a steered connect within the last
                # suspect_window_s: new connects skip them (unless all are);
                # {"addr:port": seconds left}, whole seconds (rounded down).
                "suspect": {str(b): left for b, left in sorted(st.suspect.items())},
                "suspect_window_s": self.plan.t.suspect_seconds,
                "counters": _COUNTERS_HELP,
            },
        )

    def suspect_backends(self) -> dict[Backend, float]:
        """Backends the kernel currently avoids: backend -> seconds until the
        flag expires, whole seconds (rounded down). {} when not installed."""
        st = self._observe()
        return {} if st is None else dict(st.suspect)

    def passive_failures(self) -> dict[Backend, PassiveCounts]:
        """Cumulative outcomes of steered connects per backend, counted in the
        kernel (nft/README.md, "Refused connects"): one `list set`."""
        return passive.read(self._nft, self.table)

    def close_connections(self, backends: Sequence[Backend]) -> int:
        return connections.close_connections(self.settings.listen_port, backends)

    def close(self) -> None:
        self._nft.close()

    @classmethod
    def cleanup(cls, settings: DatapathSettings) -> list[str]:
        lines: list[str] = []
        table = table_name(settings.instance)
        try:
            nft = new_nft()
        except DatapathUnavailable:
            nft = None  # nothing can have been installed through nftables
        if nft is not None and table in table_names(nft):
            rc, _, err = run(nft, Planner.cleanup_commands(table))
            if rc == 0:
                lines.append(f"deleted nft table {FAMILY} {table}")
            elif "No such file or directory" not in err:
                raise DatapathError(f"cannot delete nft table {FAMILY} {table}: {err.strip()}")

        def still_needed(_name: str) -> bool:
            return nft is not None and any(is_prism_table(nft, t) for t in table_names(nft) if t != table)

        lines.extend(sysctl.restore(settings.instance, still_needed=still_needed))
        return lines
