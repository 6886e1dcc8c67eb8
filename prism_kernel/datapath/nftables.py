"""The nftables data path: DNAT of 127.0.0.1:<listen_port> onto the backend set.

One `ip` table per instance (instance "prism-kernel" -> table `prism_kernel`),
built from the template nft/ruleset.json; nft/README.md shows the resulting
`nft list table`, explains every rule and has the measurements behind them.

- IPv4 only. IPv6 has no route_localnet: a connection from ::1 cannot be
  DNATed to a remote address (the kernel drops it as martian), so apply()
  ignores IPv6 backends (logged) and steers to the IPv4 ones.
- Every change is one libnftables JSON batch, i.e. one atomic nf_tables
  transaction, and a rejected batch changes nothing. The backend set is an
  anonymous map inside the one DNAT rule (`numgen random mod N map { 0 : a . p,
  ... }`): modulus and map are a single object, so a change replaces that rule
  in place and no packet can see N and the map disagree. (A named map of
  `ip daddr . tcp dport` values cannot be created through libnftables' JSON
  API in nftables 1.0.6, Debian 12's.)
- Nothing is written when the kernel already holds the wanted state: apply()
  reads the table and compares.
- The kernel state outlives the process: install() adopts a table an earlier
  daemon left, without writing it, when its marker (layout, template hash,
  listen port) is current; an older or damaged table is replaced in one
  transaction (delete + create in the same batch), keeping its backends.
- Host settings, saved before the first change and restored by cleanup()
  once no prism-kernel table needs them (prism_kernel.datapath.sysctl):
  `net.ipv4.conf.all.route_localnet=1` (DNAT from 127.0.0.1 to a remote
  address is martian without it) and `net.ipv4.tcp_timestamps` 1 -> 2 (one
  TCP timestamp clock for the host instead of one per connection; without it
  SNAT makes backends drop reconnecting SYNs in TIME_WAIT: nft/README.md,
  "Why connection churn was slow").

- Fast failover: close_connections() finds the connections this table
  steered in conntrack (original direction 127.0.0.1:* -> 127.0.0.1:<listen
  port>, status DNAT, reply source = the backend: one kernel-filtered dump),
  aborts each client socket by its original tuple with sock_diag SOCK_DESTROY
  (established and SYN_SENT alike; the owner gets ECONNABORTED, an established
  one also sends an RST, NATed to the backend by its entry), then deletes those
  entries (a SYN_SENT entry would otherwise hold its masquerade port for
  120 s). Direct connections to the same backend have another original
  destination and are never touched. The dump walks the whole conntrack
  hash table in the kernel (about 10 ms with 262144 buckets), so a call costs
  ~10 ms: fine for a failover, not for polling.
- passive_failures() returns {} (the base class). Conntrack events
  (NFNLGRP_CONNTRACK_NEW/UPDATE/DESTROY through ctnetlink, tried on this
  kernel) show a refused connect (DESTROY in state CLOSE without SEEN_REPLY)
  and an established one (UPDATE to ESTABLISHED), but not a SYN timeout: a
  retransmitted SYN changes no conntrack state, so a black hole shows only as
  the absence of events. And they are not cheap: every conntrack event of the
  host (all traffic, not only ours; the kernel cannot filter them by tuple)
  would be read and parsed by the daemon, and a burst overflows the socket
  (ENOBUFS: events lost), so the signal is neither complete nor reliable.

libnftables is not thread-safe: all calls of one instance go through a lock.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import ipaddress
import json
import logging
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from prism_kernel.datapath import sysctl
from prism_kernel.datapath.base import (
    BackendCounters,
    Datapath,
    DatapathSettings,
    KernelState,
)
from prism_kernel.errors import DatapathError, DatapathUnavailable
from prism_kernel.model import Backend

log = logging.getLogger(__name__)


def _import_netlink():
    """prism_kernel.datapath._netlink, imported on first use (it loads pyroute2)."""
    try:
        from prism_kernel.datapath import _netlink  # noqa: PLC0415
    except ImportError as e:
        raise DatapathError(f"pyroute2 is needed to close connections: {e}") from e
    return _netlink

# nft/ sits next to the package in the source tree (editable install). A wheel
# needs it as package data; check_available() says so when it is missing.
TEMPLATE_PATH = Path(__file__).resolve().parents[2] / "nft" / "ruleset.json"

FAMILY = "ip"
ROUTE_LOCALNET = "net.ipv4.conf.all.route_localnet"
TCP_TIMESTAMPS = "net.ipv4.tcp_timestamps"
MARKER_PREFIX = "prism-kernel nftables"
# The first rule of this chain carries the marker; other instances' tables
# are recognised by it (cleanup keeps the sysctls while one remains).
MARKER_CHAIN = "nat_postrouting"
STEER_CHAIN = "nat_output"
COUNTER_SET = "backends"
CVE_CHAIN = "filter_prerouting"
_NAME = "nftables"
_ENOENT = "No such file or directory"
_LOOPBACK = ipaddress.IPv4Address("127.0.0.1")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def table_name(instance: str) -> str:
    """nft table name for an instance: "prism-kernel" -> "prism_kernel"."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", instance)
    if not name or not name[0].isalpha():
        name = "pk_" + name
    return name[:64]


# --------------------------------------------------------------------------
# Template


_PLACEHOLDER = re.compile(r"\$\{([a-z_]+)\}")


class Template:
    """nft/ruleset.json, parsed and checked."""

    def __init__(self, raw: dict[str, Any], source: str):
        self.source = source
        try:
            self.layout = int(raw["layout"])
            self.table = raw["table"]
            self.objects: list[dict[str, Any]] = list(raw["objects"])
            self.steer_rule: dict[str, Any] = raw["steer_rule"]
        except (KeyError, TypeError, ValueError) as e:
            raise DatapathError(f"nft template {source}: missing or bad key {e}") from e
        canon = json.dumps({"layout": self.layout, "table": self.table, "objects": self.objects,
                            "steer_rule": self.steer_rule}, sort_keys=True, separators=(",", ":"))
        self.digest = hashlib.sha256(canon.encode()).hexdigest()[:12]
        # What a current table looks like: chains and how many rules each has.
        self.chains: dict[str, dict[str, Any]] = {}
        self.rule_counts: dict[str, int] = {}
        for obj in self.objects:
            if not isinstance(obj, dict) or len(obj) != 1:
                raise DatapathError(f"nft template {source}: bad object {obj!r:.80}")
            kind, body = next(iter(obj.items()))
            if kind == "chain":
                self.chains[body["name"]] = body
                self.rule_counts.setdefault(body["name"], 0)
            elif kind == "rule":
                self.rule_counts[body["chain"]] = self.rule_counts.get(body["chain"], 0) + 1
            elif kind not in ("set", "map"):
                raise DatapathError(f"nft template {source}: unsupported object {kind!r}")
        for needed in (STEER_CHAIN, MARKER_CHAIN, CVE_CHAIN):
            if needed not in self.chains:
                raise DatapathError(f"nft template {source}: chain {needed!r} missing")

    @classmethod
    def load(cls, path: Path | None = None) -> "Template":
        path = path or TEMPLATE_PATH
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise DatapathError(f"nft template {path} not found (the nft/ directory must ship "
                                f"with prism_kernel)") from e
        except (OSError, ValueError) as e:
            raise DatapathError(f"nft template {path} unreadable: {e}") from e
        return cls(raw, str(path))

    def render(self, value: Any, params: dict[str, Any]) -> Any:
        """Deep copy of `value` with ${name} placeholders filled in."""
        if isinstance(value, str):
            whole = _PLACEHOLDER.fullmatch(value)
            try:
                if whole:
                    return copy.deepcopy(params[whole.group(1)])
                return _PLACEHOLDER.sub(lambda m: str(params[m.group(1)]), value)
            except KeyError as e:
                raise DatapathError(f"nft template {self.source}: no value for ${{{e.args[0]}}}") from e
        if isinstance(value, list):
            return [self.render(v, params) for v in value]
        if isinstance(value, dict):
            return {k: self.render(v, params) for k, v in value.items()}
        return value


_TEMPLATE: Template | None = None
_TEMPLATE_LOCK = threading.Lock()


def template() -> Template:
    global _TEMPLATE
    with _TEMPLATE_LOCK:
        if _TEMPLATE is None:
            _TEMPLATE = Template.load()
        return _TEMPLATE


# --------------------------------------------------------------------------
# What the kernel holds


@dataclass
class _Observed:
    chains: dict[str, dict[str, Any]] = field(default_factory=dict)
    rules: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    has_counter_set: bool = False
    counters: dict[Backend, tuple[int, int]] = field(default_factory=dict)
    steer_handle: int | None = None
    steer_targets: tuple[Backend, ...] | None = None  # None: absent, unreadable or inconsistent
    modulus: int | None = None
    cve_drops: int | None = None

    @property
    def marker(self) -> str | None:
        rules = self.rules.get(MARKER_CHAIN) or []
        return rules[0].get("comment") if rules else None


def _backend_from_concat(value: Any) -> Backend | None:
    try:
        addr, port = value["concat"]
        return Backend.of(addr, int(port))
    except (KeyError, TypeError, ValueError):
        return None


def _parse_steer(rule: dict[str, Any]) -> tuple[int | None, tuple[Backend, ...] | None]:
    """(modulus, targets) of the DNAT rule; targets None when N and the map disagree."""
    for expr in rule.get("expr", []):
        dnat = expr.get("dnat") if isinstance(expr, dict) else None
        if not dnat:
            continue
        try:
            mapping = dnat["addr"]["map"]
            mod = int(mapping["key"]["numgen"]["mod"])
            entries = mapping["data"]["set"]
        except (KeyError, TypeError, ValueError):
            return None, None
        if isinstance(entries, list) and len(entries) == 2 and not isinstance(entries[0], list):
            entries = [entries]  # a one-element map may come back unwrapped
        if not isinstance(entries, list):
            return mod, None
        slots: dict[int, Backend] = {}
        for entry in entries:
            try:
                idx, target = entry
                b = _backend_from_concat(target)
            except (TypeError, ValueError):
                return mod, None
            if b is None or int(idx) in slots:
                return mod, None
            slots[int(idx)] = b
        if sorted(slots) != list(range(mod)):
            return mod, None  # N and the map disagree: never written by us
        return mod, tuple(sorted(slots.values()))
    return None, None


def _parse_table(objects: list[dict[str, Any]]) -> _Observed:
    obs = _Observed()
    for obj in objects:
        if "chain" in obj:
            obs.chains[obj["chain"]["name"]] = obj["chain"]
            obs.rules.setdefault(obj["chain"]["name"], [])
        elif "set" in obj and obj["set"].get("name") == COUNTER_SET:
            obs.has_counter_set = True
            for elem in obj["set"].get("elem", []) or []:
                val, cnt = elem, {}
                if isinstance(elem, dict) and "elem" in elem:
                    val, cnt = elem["elem"].get("val"), elem["elem"].get("counter") or {}
                b = _backend_from_concat(val)
                if b is not None:
                    obs.counters[b] = (int(cnt.get("packets", 0)), int(cnt.get("bytes", 0)))
        elif "rule" in obj:
            rule = obj["rule"]
            obs.rules.setdefault(rule["chain"], []).append(rule)
    for rule in obs.rules.get(STEER_CHAIN, []):
        if any(isinstance(e, dict) and "dnat" in e for e in rule.get("expr", [])):
            obs.steer_handle = rule.get("handle")
            obs.modulus, obs.steer_targets = _parse_steer(rule)
            break
    for rule in obs.rules.get(CVE_CHAIN, []):
        for expr in rule.get("expr", []):
            if isinstance(expr, dict) and isinstance(expr.get("counter"), dict):
                obs.cve_drops = int(expr["counter"].get("packets", 0))
    return obs


# --------------------------------------------------------------------------
# libnftables access


def _new_nft() -> Any:
    try:
        import nftables  # Debian python3-nftables (not on PyPI)
    except ImportError as e:
        raise DatapathUnavailable(
            _NAME, f"Python module 'nftables' not importable ({e}); install the Debian "
                   f"package python3-nftables and use a venv with --system-site-packages") from e
    try:
        nft = nftables.Nftables()
    except Exception as e:  # OSError when libnftables.so.1 is missing
        raise DatapathUnavailable(_NAME, f"libnftables not loadable: {e}") from e
    nft.set_json_output(True)
    nft.set_handle_output(True)
    return nft


def _run(nft: Any, cmds: list[dict[str, Any]]) -> tuple[int, Any, str]:
    try:
        rc, out, err = nft.json_cmd({"nftables": cmds})
    except (ValueError, TypeError) as e:  # JSON (de)serialisation trouble
        return 1, None, str(e)
    return rc, out, err or ""


def _list(nft: Any, what: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Objects of one `list` command; None when the object does not exist."""
    rc, out, err = _run(nft, [{"list": what}])
    if rc != 0:
        if _ENOENT in err:
            return None
        raise DatapathError(f"nft list {json.dumps(what)} failed: {err.strip()}")
    if not isinstance(out, dict):
        return []
    return [o for o in out.get("nftables", []) if "metainfo" not in o]


def _table_names(nft: Any) -> list[str]:
    objs = _list(nft, {"tables": {"family": FAMILY}}) or []
    return [o["table"]["name"] for o in objs if "table" in o]


def _is_prism_table(nft: Any, name: str) -> bool:
    objs = _list(nft, {"chain": {"family": FAMILY, "table": name, "name": MARKER_CHAIN}}) or []
    return any("rule" in o and (o["rule"].get("comment") or "").startswith(MARKER_PREFIX)
               for o in objs)


# --------------------------------------------------------------------------
# The data path


class NftablesDatapath(Datapath):
    name = _NAME
    # The host settings the data path needs, in the order they are applied.
    # tcp_timestamps: only the kernel default 1 (a random clock per
    # connection) is changed, to 2 (one clock per host); 0 (off) or an
    # operator's 2 are left alone.
    SYSCTLS: ClassVar[tuple[tuple[str, str, tuple[str, ...]], ...]] = (
        (ROUTE_LOCALNET, "1", ()),
        (TCP_TIMESTAMPS, "2", ("1",)),
    )
    # False reproduces the ruleset before the fix (tcp_timestamps untouched),
    # for the benchmark's evidence runs; never for production.
    fix_tcp_timestamps: ClassVar[bool] = True

    def __init__(self, settings: DatapathSettings):
        super().__init__(settings)
        self.table = table_name(settings.instance)
        self._template = template()
        self._nft: Any = None
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    # -- availability ------------------------------------------------------

    @classmethod
    def check_available(cls, settings: DatapathSettings) -> None:
        nft = _new_nft()
        try:
            template()
        except DatapathError as e:
            raise DatapathUnavailable(_NAME, str(e)) from e
        for name, _, _ in cls.SYSCTLS:
            knob = sysctl.PROC_SYS / name.replace(".", "/")
            if not knob.exists():
                raise DatapathUnavailable(_NAME, f"{knob} missing (no IPv4 in this kernel?)")
            if not os.access(knob, os.W_OK):
                raise DatapathUnavailable(
                    _NAME, f"cannot write {knob}: needs root (CAP_NET_ADMIN) and a writable /proc/sys")
        rc, _, err = _run(nft, [{"list": {"tables": {"family": FAMILY}}}])
        if rc != 0:
            raise DatapathUnavailable(_NAME, f"nft does not work here: {err.strip()}")
        # The kernel validates the whole ruleset (NAT, numgen, masquerade,
        # conntrack expressions) in a dry run: sent, checked, never committed.
        probe = cls(DatapathSettings(listen_port=settings.listen_port,
                                     instance=f"{settings.instance}-probe"))
        cmds = probe._create_cmds((Backend.of("192.0.2.1", 6443),), replace=False)
        nft.set_dry_run(True)
        try:
            rc, _, err = _run(nft, cmds)
        finally:
            nft.set_dry_run(False)
        if rc != 0:
            raise DatapathUnavailable(
                _NAME, f"kernel rejects the ruleset (nf_tables NAT/numgen/conntrack missing?): "
                       f"{err.strip()}")

    # -- helpers -----------------------------------------------------------

    def _nft_handle(self) -> Any:
        if self._nft is None:
            try:
                self._nft = _new_nft()
            except DatapathUnavailable as e:
                raise DatapathError(str(e)) from e
        return self._nft

    def _marker(self) -> str:
        return (f"{MARKER_PREFIX} layout={self._template.layout} "
                f"template={self._template.digest} listen=127.0.0.1:{self.settings.listen_port}")

    def _params(self) -> dict[str, Any]:
        return {"table": self.table, "listen_port": self.settings.listen_port,
                "marker": self._marker()}

    def _desired(self, backends: Sequence[Backend]) -> tuple[Backend, ...]:
        """The validated IPv4 set, sorted; DatapathError on bad input, before
        anything is written."""
        v4: set[Backend] = set()
        v6: set[Backend] = set()
        for b in backends:
            if not isinstance(b, Backend):
                raise DatapathError(f"not a Backend: {b!r}")
            if isinstance(b.port, bool) or not isinstance(b.port, int) or not 1 <= b.port <= 65535:
                raise DatapathError(f"backend {b}: port out of range")
            if b.family == 6 and isinstance(b.address, ipaddress.IPv6Address):
                v6.add(b)
                continue
            if b.family != 4 or not isinstance(b.address, ipaddress.IPv4Address):
                raise DatapathError(f"backend {b}: family {b.family} does not match its address")
            a = b.address
            if a.is_unspecified or a.is_multicast or a.is_reserved or a == _BROADCAST:
                raise DatapathError(f"backend {b}: not a unicast address")
            if a == _LOOPBACK and b.port == self.settings.listen_port:
                raise DatapathError(f"backend {b} is the listen address itself")
            v4.add(b)
        if v6:
            key = "v6:" + ",".join(map(str, sorted(v6)))
            if key not in self._warned:
                self._warned.add(key)
                log.warning("nftables data path is IPv4-only: ignoring IPv6 backend(s) %s "
                            "(IPv6 has no route_localnet: DNAT from ::1 cannot leave the host)",
                            ", ".join(map(str, sorted(v6))))
        return tuple(sorted(v4))

    def _elements(self, backends: Sequence[Backend]) -> list[dict[str, Any]]:
        return [{"concat": [str(b.address), b.port]} for b in backends]

    def _steer_rule(self, targets: tuple[Backend, ...], handle: int | None = None) -> dict[str, Any]:
        params = self._params()
        params["modulus"] = len(targets)
        params["targets"] = [[i, {"concat": [str(b.address), b.port]}]
                             for i, b in enumerate(targets)]
        rule = self._template.render(self._template.steer_rule, params)
        if handle is not None:
            rule["rule"]["handle"] = handle
        return rule

    def _create_cmds(self, targets: tuple[Backend, ...], replace: bool) -> list[dict[str, Any]]:
        t, params = self._template, self._params()
        cmds: list[dict[str, Any]] = []
        if replace:  # delete + create in one batch: one generation switch
            cmds.append({"delete": {"table": {"family": FAMILY, "name": self.table}}})
        cmds.append({"add": {"table": t.render(t.table, params)}})
        cmds.extend({"add": t.render(obj, params)} for obj in t.objects)
        if targets:
            cmds.append({"add": {"element": {"family": FAMILY, "table": self.table,
                                             "name": COUNTER_SET, "elem": self._elements(targets)}}})
            cmds.append({"add": self._steer_rule(targets)})
        return cmds

    def _observe(self) -> _Observed | None:
        objs = _list(self._nft_handle(), {"table": {"family": FAMILY, "name": self.table}})
        return None if objs is None else _parse_table(objs)

    def _problems(self, obs: _Observed) -> list[str]:
        """Why an installed table is not the current layout ([] = it is)."""
        t = self._template
        problems = []
        if obs.marker != self._marker():
            problems.append(f"marker {obs.marker!r}, want {self._marker()!r}")
        for name, spec in t.chains.items():
            have = obs.chains.get(name)
            if have is None:
                problems.append(f"chain {name} missing")
                continue
            for key in ("type", "hook", "prio", "policy"):
                if spec.get(key) != have.get(key):
                    problems.append(f"chain {name}: {key} {have.get(key)!r}, want {spec.get(key)!r}")
        for name, rules in obs.rules.items():
            if name not in t.chains:
                problems.append(f"unexpected chain {name}")
                continue
            want = t.rule_counts.get(name, 0)
            extra = 1 if name == STEER_CHAIN else 0  # the DNAT rule; absent for an empty set
            if not want <= len(rules) <= want + extra:
                problems.append(f"chain {name}: {len(rules)} rules, want {want}")
        if obs.rules.get(STEER_CHAIN) and obs.steer_handle is None:
            problems.append("no DNAT rule in nat_output")
        elif obs.steer_handle is not None and obs.steer_targets is None:
            problems.append("DNAT rule unreadable (numgen modulus and map disagree?)")
        if not obs.has_counter_set:
            problems.append(f"set {COUNTER_SET} missing")
        return problems

    def _update_cmds(self, obs: _Observed, targets: tuple[Backend, ...]) -> list[dict[str, Any]]:
        cmds: list[dict[str, Any]] = []
        if obs.steer_targets != targets and (targets or obs.steer_handle is not None):
            if targets and obs.steer_handle is not None:
                cmds.append({"replace": self._steer_rule(targets, obs.steer_handle)})
            elif targets:
                cmds.append({"add": self._steer_rule(targets)})
            else:  # empty set: no DNAT, connects to 127.0.0.1:port are refused
                cmds.append({"delete": {"rule": {"family": FAMILY, "table": self.table,
                                                 "chain": STEER_CHAIN, "handle": obs.steer_handle}}})
        # Per-backend counters: only changed elements, so the others keep counting.
        ref = {"family": FAMILY, "table": self.table, "name": COUNTER_SET}
        have, want = set(obs.counters), set(targets)
        if have - want:
            cmds.append({"delete": {"element": {**ref, "elem": self._elements(sorted(have - want))}}})
        if want - have:
            cmds.append({"add": {"element": {**ref, "elem": self._elements(sorted(want - have))}}})
        return cmds

    def _commit(self, cmds: list[dict[str, Any]], what: str) -> None:
        rc, _, err = _run(self._nft_handle(), cmds)
        if rc != 0:
            raise DatapathError(f"nftables {what} rejected, kernel state unchanged: {err.strip()}")

    def _ensure_sysctls(self) -> None:
        for name, value, only_from in self.SYSCTLS:
            if name == TCP_TIMESTAMPS and not (self.fix_tcp_timestamps and self.settings.nft_stable_tcp_timestamps):
                continue
            current = sysctl.read(name)
            if only_from and current not in only_from and current != value:
                if name not in self._warned:
                    self._warned.add(name)
                    log.warning("%s=%s left as set by the operator; with SNAT, reconnects may "
                                "stall on SYN retransmits (see nft/README.md)", name, current)
                continue
            if sysctl.ensure(self.settings.instance, name, value):
                log.info("set %s=%s (previous value %s saved in %s)", name, value, current,
                         sysctl.state_path(self.settings.instance))

    # -- the interface -----------------------------------------------------

    def install(self, initial: Sequence[Backend]) -> bool:
        """Create the table, or adopt the one an earlier daemon left. True
        when a table existed (adopted as is, or upgraded in place keeping the
        backends it steered to); `initial` is then not written."""
        targets = self._desired(initial)
        with self._lock:
            # Settings first: a DNAT to a remote backend without
            # route_localnet is dropped as martian.
            self._ensure_sysctls()
            obs = self._observe()
            if obs is None:
                self._commit(self._create_cmds(targets, replace=False), "install")
                log.info("installed nft table %s %s", FAMILY, self.table)
                return False
            problems = self._problems(obs)
            if not problems:
                log.info("adopted nft table %s %s (%d backends)", FAMILY, self.table,
                         len(obs.steer_targets or ()))
                return True
            keep = obs.steer_targets if obs.steer_targets else targets
            log.info("replacing nft table %s %s in one transaction: %s", FAMILY, self.table,
                     "; ".join(problems))
            self._commit(self._create_cmds(keep, replace=True), "table upgrade")
            return True

    def apply(self, backends: Sequence[Backend]) -> bool:
        targets = self._desired(backends)
        with self._lock:
            self._ensure_sysctls()
            obs = self._observe()
            if obs is None or self._problems(obs):
                self._commit(self._create_cmds(targets, replace=obs is not None), "re-install")
                log.warning("nft table %s %s was %s; re-created", FAMILY, self.table,
                            "missing" if obs is None else "damaged")
                return True
            cmds = self._update_cmds(obs, targets)
            if not cmds:
                return False
            self._commit(cmds, "backend update")
            return True

    def read_state(self) -> KernelState:
        with self._lock:
            obs = self._observe()
        knobs = {}
        for name, _, _ in self.SYSCTLS:
            try:
                knobs[name.rsplit(".", 1)[-1]] = sysctl.read(name)
            except DatapathError:
                knobs[name.rsplit(".", 1)[-1]] = "?"
        base = {"table": self.table, "family": FAMILY, **knobs}
        if obs is None:
            return KernelState(datapath=self.name, installed=False, details=base)
        problems = self._problems(obs)
        return KernelState(
            datapath=self.name,
            installed=True,
            backends=obs.steer_targets or (),
            counters={b: BackendCounters(connections=pkts) for b, (pkts, _) in obs.counters.items()},
            details={
                **base,
                "handles": {"dnat_rule": obs.steer_handle},
                "modulus": obs.modulus,
                "current_layout": not problems,
                "problems": problems,
                "marker": obs.marker,
                "cve_2020_8558_drops": obs.cve_drops,
                "counters": "connections: new connections steered to the backend since it "
                            "entered the set",
            },
        )

    def close_connections(self, backends: Sequence[Backend]) -> int:
        """Abort every connection this table DNATed to `backends` (IPv4 only:
        nothing else is steered here); returns how many client sockets were
        aborted. Their conntrack entries are deleted afterwards."""
        targets = {(b.address, b.port) for b in backends
                   if b.family == 4 and isinstance(b.address, ipaddress.IPv4Address)}
        if not targets:
            return 0
        _netlink = _import_netlink()  # pyroute2: ~10 MB of RSS, so only on failover

        try:
            entries = _netlink.dnat_entries(str(_LOOPBACK), self.settings.listen_port)
        except OSError as e:
            raise DatapathError(f"conntrack dump failed: {e}") from e
        ours = [e for e in entries if (e.reply_src, e.reply_sport) in targets]
        if not ours:
            return 0
        socks = [_netlink.SockId(src=e.orig_src, sport=e.orig_sport, dst=e.orig_dst,
                                 dport=e.orig_dport) for e in ours]
        try:
            res = _netlink.destroy_sockets(socks)
        except OSError as e:
            raise DatapathError(f"sock_diag SOCK_DESTROY failed: {e}") from e
        # After the sockets: an established one's RST still needs its entry for NAT.
        try:
            deleted = _netlink.delete_entries(ours)
        except OSError as e:
            log.warning("deleting %d conntrack entries failed: %s", len(ours), e)
            deleted = 0
        other = {e: n for e, n in res.errors().items() if e != errno.ENOENT}
        if other:
            desc = ", ".join(f"{os.strerror(e)} x{n}" for e, n in other.items())
            if res.destroyed == 0 and sum(other.values()) == len(socks):
                raise DatapathError(f"sock_diag SOCK_DESTROY refused for all {len(socks)} "
                                    f"sockets: {desc} (needs CAP_NET_ADMIN and "
                                    f"CONFIG_INET_DIAG_DESTROY)")
            log.warning("close_connections: %d aborted, %d failed: %s", res.destroyed,
                        sum(other.values()), desc)
        log.debug("close_connections: %d conntrack entries, %d sockets aborted, %d entries "
                  "deleted", len(ours), res.destroyed, deleted)
        return res.destroyed

    def close(self) -> None:
        with self._lock:
            self._nft = None

    @classmethod
    def cleanup(cls, settings: DatapathSettings) -> list[str]:
        lines: list[str] = []
        table = table_name(settings.instance)
        try:
            nft = _new_nft()
        except DatapathUnavailable:
            nft = None  # nothing can have been installed through nftables
        if nft is not None and table in _table_names(nft):
            rc, _, err = _run(nft, [{"delete": {"table": {"family": FAMILY, "name": table}}}])
            if rc == 0:
                lines.append(f"deleted nft table {FAMILY} {table}")
            elif _ENOENT not in err:
                raise DatapathError(f"cannot delete nft table {FAMILY} {table}: {err.strip()}")

        def still_needed(_name: str) -> bool:
            if nft is None:
                return False
            return any(_is_prism_table(nft, t) for t in _table_names(nft) if t != table)

        lines.extend(sysctl.restore(settings.instance, still_needed=still_needed))
        return lines
