"""The nftables data path: DNAT of 127.0.0.1:<listen_port> onto the backend set.

One `ip` table per instance (instance "prism-kernel" -> table `prism_kernel`),
built from the template nft/ruleset.json; nft/README.md shows the resulting
`nft list table`, explains every rule and has the measurements behind them.

- IPv4 only. IPv6 has no route_localnet: a connection from ::1 cannot be
  DNATed to a remote address (the kernel drops it as martian), so apply()
  ignores IPv6 backends (logged) and steers to the IPv4 ones.
- Every change is one libnftables JSON batch, i.e. one atomic nf_tables
  transaction, and a rejected batch changes nothing. The DNAT rule draws a
  slot with an anonymous verdict map in the one rule (`numgen random mod N
  vmap { 0 : goto pick_0, ... }`): modulus and map are a single object, so
  no packet can see N and the map disagree. Each slot's chain `pick_i`
  DNATs to its backend unless that backend is flagged suspect, else to the
  next unflagged one in ring order, else (all flagged) to its own backend.
  A set change rewrites the rule, the pick chains and the per-backend
  objects in the same batch. (A named map of `ip daddr . tcp dport` values
  cannot be created through libnftables' JSON API in nftables 1.0.6,
  Debian 12's.)
- Refused connects are handled in the kernel (nft/README.md, "Refused
  connects"): a rule in filter_prerouting catches a backend's RST (or
  SYN-ACK) to a steered connect that never became ASSURED, counts it per
  backend in the dynamic sets `refused` / `established` (read by
  passive_failures()), and for an RST raises the backend's suspect flag for
  2 s (set `suspect_<id>`, timeout element), which the pick chains honour.
  The flag expires by itself; no userspace is in the loop.
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

- Fast failover: close_connections() takes the live TCP sockets connected
  to 127.0.0.1:<listen port> (a sock_diag dump the kernel filters by port,
  both families), looks up each one's conntrack entry by its exact tuple
  (one batch of CT_GET) and keeps those DNATed to a dead backend; it aborts
  those sockets with sock_diag SOCK_DESTROY (established and SYN_SENT alike;
  the owner gets ECONNABORTED, an established one also sends an RST, NATed
  to the backend by its entry), then deletes their entries (a SYN_SENT entry
  would otherwise hold its masquerade port for 120 s), and the entries of
  unanswered connects to it whose socket is gone (a new SYN reusing that
  source port would be taken for a retransmission and follow the old NAT
  binding to the dead backend). Direct connections to the same backend have
  another original destination and are never touched. The sockets are not
  found through a dump of the conntrack table: under churn it holds
  thousands of TIME_WAIT entries, and parsing them delayed the aborts by
  0.1-0.6 s (the one dump left, of never-answered entries, runs after the
  aborts).
- passive_failures(): three `list set` calls (~0.4 ms): refused, established
  and syn_timeouts per backend, cumulative while the table lives (a backend
  keeps its counts after leaving the set; a table replacement starts at
  zero). A black hole shows as syn_timeouts: the client's retransmitted SYN
  passes the output hook with an entry that is already confirmed (the first
  SYN's is not, until postrouting), about 1 s after connect(); the rule in
  `filter_output` counts it and flags the backend suspect, as an RST does.
  (Conntrack events through ctnetlink were the other candidate, and
  rejected: every event of the host would be read by the daemon, and a
  burst overflows the socket.)

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
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from prism_kernel._data import data_file
from prism_kernel.core.model import Backend
from prism_kernel.datapath import sysctl
from prism_kernel.datapath.base import (
    BackendCounters,
    Datapath,
    DatapathSettings,
    KernelState,
    PassiveCounts,
    import_netlink,
)
from prism_kernel.errors import DatapathError, DatapathUnavailable

log = logging.getLogger(__name__)



# Package data of an installed package, nft/ of a source checkout;
# check_available() says so when it is missing.
TEMPLATE_PATH = data_file("nft", "ruleset.json")

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
# Passive outcome counters (dynamic sets, one counter element per backend),
# the map backend -> its flag chain, and the names of the steering's
# per-slot and per-backend objects.
REFUSED_SET = "refused"
ESTABLISHED_SET = "established"
SYN_TIMEOUTS_SET = "syn_timeouts"
FLAG_MAP = "flag"
PICK_PREFIX = "pick_"
SUSPECT_PREFIX = "suspect_"
FLAG_PREFIX = "flag_"
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
            self.pick_chain: dict[str, Any] = raw["pick_chain"]
            self.pick_unless_suspect: dict[str, Any] = raw["pick_rules"]["unless_suspect"]
            self.pick_all_suspect: dict[str, Any] = raw["pick_rules"]["all_suspect"]
            per_backend = raw["per_backend"]
            self.suspect_set: dict[str, Any] = per_backend["set"]
            self.flag_chain: dict[str, Any] = per_backend["chain"]
            self.flag_rule: dict[str, Any] = per_backend["rule"]
            self.flag_element: dict[str, Any] = per_backend["element"]
            self.suspect_seconds = int(raw["suspect_seconds"])
        except (KeyError, TypeError, ValueError) as e:
            raise DatapathError(f"nft template {source}: missing or bad key {e}") from e
        canon = json.dumps({k: v for k, v in raw.items() if k != "about"}, sort_keys=True,
                           separators=(",", ":"))
        self.digest = hashlib.sha256(canon.encode()).hexdigest()[:12]
        # What a current table looks like: chains and how many rules each
        # has, and its named sets and maps (the steering's own chains and
        # sets come on top, checked against the DNAT rule).
        self.chains: dict[str, dict[str, Any]] = {}
        self.rule_counts: dict[str, int] = {}
        self.sets: dict[str, dict[str, Any]] = {}
        for obj in self.objects:
            if not isinstance(obj, dict) or len(obj) != 1:
                raise DatapathError(f"nft template {source}: bad object {obj!r:.80}")
            kind, body = next(iter(obj.items()))
            if kind == "chain":
                self.chains[body["name"]] = body
                self.rule_counts.setdefault(body["name"], 0)
            elif kind == "rule":
                self.rule_counts[body["chain"]] = self.rule_counts.get(body["chain"], 0) + 1
            elif kind in ("set", "map"):
                self.sets[body["name"]] = body
            else:
                raise DatapathError(f"nft template {source}: unsupported object {kind!r}")
        for needed in (STEER_CHAIN, MARKER_CHAIN, CVE_CHAIN):
            if needed not in self.chains:
                raise DatapathError(f"nft template {source}: chain {needed!r} missing")
        for needed in (COUNTER_SET, REFUSED_SET, ESTABLISHED_SET, SYN_TIMEOUTS_SET, FLAG_MAP):
            if needed not in self.sets:
                raise DatapathError(f"nft template {source}: set {needed!r} missing")

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


def backend_id(b: Backend) -> str:
    """The name part of a backend's own objects: 198.18.1.2:8080 -> "198_18_1_2_8080"."""
    return f"{str(b.address).replace('.', '_')}_{b.port}"


def _backend_of_id(ident: str) -> Backend | None:
    parts = ident.split("_")
    if len(parts) != 5 or not all(p.isdigit() for p in parts):
        return None
    try:
        return Backend.of(".".join(parts[:4]), int(parts[4]))
    except ValueError:
        return None


@dataclass
class _Observed:
    chains: dict[str, dict[str, Any]] = field(default_factory=dict)
    rules: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    sets: dict[str, dict[str, Any]] = field(default_factory=dict)  # named sets and maps
    counters: dict[Backend, tuple[int, int]] = field(default_factory=dict)
    refused: dict[Backend, int] = field(default_factory=dict)
    established: dict[Backend, int] = field(default_factory=dict)
    syn_timeouts: dict[Backend, int] = field(default_factory=dict)
    flags: dict[Backend, str | None] = field(default_factory=dict)  # map `flag`: backend -> goto chain
    suspect: dict[Backend, float] = field(default_factory=dict)  # flagged backend -> seconds left
    steer_handle: int | None = None
    steer_targets: tuple[Backend, ...] | None = None  # None: absent, unreadable or inconsistent
    steer_problem: str | None = None  # why steer_targets is None although there is a DNAT rule
    slot_order: tuple[Backend, ...] = ()  # the backends by slot, as the kernel holds them
    modulus: int | None = None
    cve_drops: int | None = None
    layout1: bool = False  # the DNAT rule is the layout-1 form (a map in the rule, no pick chains)

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


def _map_entries(entries: Any) -> list[Any] | None:
    """The [key, value] pairs of a map as listed (a one-element map may come
    back unwrapped)."""
    if isinstance(entries, list) and len(entries) == 2 and not isinstance(entries[0], list):
        entries = [entries]
    return entries if isinstance(entries, list) else None


def _parse_steer_v1(rule: dict[str, Any]) -> tuple[int | None, tuple[Backend, ...] | None]:
    """(modulus, targets) of a layout-1 DNAT rule (`dnat to numgen random mod N
    map { i : addr . port }`); read only to carry its set into a new table."""
    for expr in rule.get("expr", []):
        dnat = expr.get("dnat") if isinstance(expr, dict) else None
        if not dnat:
            continue
        try:
            mapping = dnat["addr"]["map"]
            mod = int(mapping["key"]["numgen"]["mod"])
            entries = _map_entries(mapping["data"]["set"])
        except (KeyError, TypeError, ValueError):
            return None, None
        if entries is None:
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
            return mod, None
        return mod, tuple(sorted(slots.values()))
    return None, None


def _parse_vmap(rule: dict[str, Any]) -> tuple[int, dict[int, str]] | None:
    """(modulus, slot -> goto chain) of the DNAT rule (`numgen random mod N
    vmap { i : goto pick_i }`); None when the rule has no such vmap."""
    for expr in rule.get("expr", []):
        vmap = expr.get("vmap") if isinstance(expr, dict) else None
        if not vmap:
            continue
        try:
            mod = int(vmap["key"]["numgen"]["mod"])
            entries = _map_entries(vmap["data"]["set"])
        except (KeyError, TypeError, ValueError):
            return None
        slots: dict[int, str] = {}
        for entry in entries or []:
            try:
                idx, verdict = entry
                slots[int(idx)] = verdict["goto"]["target"]
            except (KeyError, TypeError, ValueError):
                slots[-1] = ""  # unreadable: fails the check below
        return mod, slots
    return None


def _parse_pick_rule(rule: dict[str, Any]) -> tuple[str | None, Backend | None]:
    """(suspect set looked up, DNAT target) of a pick chain's rule."""
    suspect, target = None, None
    for expr in rule.get("expr", []):
        if not isinstance(expr, dict):
            continue
        m = expr.get("match")
        if isinstance(m, dict) and isinstance(m.get("right"), str) and m["right"].startswith("@"):
            suspect = m["right"][1:] if m.get("op") == "!=" else "?"
        d = expr.get("dnat")
        if isinstance(d, dict):
            try:
                target = Backend.of(d["addr"], int(d["port"]))
            except (KeyError, TypeError, ValueError):
                target = None
    return suspect, target


def _counter_elements(body: dict[str, Any]) -> dict[Backend, tuple[int, int]]:
    out: dict[Backend, tuple[int, int]] = {}
    for elem in body.get("elem", []) or []:
        val, cnt = elem, {}
        if isinstance(elem, dict) and "elem" in elem:
            val, cnt = elem["elem"].get("val"), elem["elem"].get("counter") or {}
        b = _backend_from_concat(val)
        if b is not None:
            out[b] = (int(cnt.get("packets", 0)), int(cnt.get("bytes", 0)))
    return out


def _expires(body: dict[str, Any]) -> float | None:
    """Seconds until the last element of a suspect set expires; None when it
    has none (the kernel does not list expired elements). libnftables' JSON
    gives whole seconds, rounded down."""
    left = None
    for elem in body.get("elem", []) or []:
        e = elem.get("elem") if isinstance(elem, dict) else None
        expires = e.get("expires", 0) if isinstance(e, dict) else 0
        left = max(left or 0.0, float(expires or 0))
    return left


def _check_steering(obs: _Observed) -> None:
    """Fill obs.steer_targets from the DNAT rule and its pick chains, or
    obs.steer_problem when they are not what apply() writes."""
    rule = next(r for r in obs.rules[STEER_CHAIN] if r.get("handle") == obs.steer_handle)
    parsed = _parse_vmap(rule)
    if parsed is None:
        obs.modulus, obs.steer_targets = _parse_steer_v1(rule)
        obs.layout1 = obs.steer_targets is not None
        if not obs.layout1:
            obs.steer_problem = "DNAT rule unreadable"
        return
    mod, slots = parsed
    obs.modulus = mod
    if sorted(slots) != list(range(mod)) or any(slots[i] != f"{PICK_PREFIX}{i}" for i in range(mod)):
        obs.steer_problem = f"numgen modulus {mod} and vmap {sorted(slots)} disagree"
        return
    picks = {i: [_parse_pick_rule(r) for r in obs.rules.get(f"{PICK_PREFIX}{i}", [])]
             for i in range(mod)}
    order: list[Backend] = []
    for i in range(mod):
        last = picks[i][-1] if picks[i] else (None, None)
        if last[0] is not None or last[1] is None:
            obs.steer_problem = f"chain {PICK_PREFIX}{i} does not end in a plain DNAT"
            return
        order.append(last[1])
    if len(set(order)) != mod:
        obs.steer_problem = "a backend in two slots"
        return
    for i in range(mod):
        want = [(SUSPECT_PREFIX + backend_id(order[(i + k) % mod]), order[(i + k) % mod])
                for k in range(mod)] + [(None, order[i])]
        if picks[i] != want:
            obs.steer_problem = f"chain {PICK_PREFIX}{i} is not the fallback order of slot {i}"
            return
    obs.slot_order = tuple(order)
    obs.steer_targets = tuple(sorted(order))


def _parse_table(objects: list[dict[str, Any]]) -> _Observed:
    obs = _Observed()
    for obj in objects:
        if "chain" in obj:
            obs.chains[obj["chain"]["name"]] = obj["chain"]
            obs.rules.setdefault(obj["chain"]["name"], [])
        elif "set" in obj or "map" in obj:
            body = obj.get("set") or obj.get("map")
            name = body.get("name", "")
            obs.sets[name] = body
            if name == COUNTER_SET:
                obs.counters = _counter_elements(body)
            elif name == REFUSED_SET:
                obs.refused = {b: n for b, (n, _) in _counter_elements(body).items()}
            elif name == ESTABLISHED_SET:
                obs.established = {b: n for b, (n, _) in _counter_elements(body).items()}
            elif name == SYN_TIMEOUTS_SET:
                obs.syn_timeouts = {b: n for b, (n, _) in _counter_elements(body).items()}
            elif name == FLAG_MAP:
                for entry in _map_entries(body.get("elem") or []) or []:
                    try:
                        key, verdict = entry
                    except (TypeError, ValueError):
                        continue
                    b = _backend_from_concat(key)
                    if b is not None:
                        target = verdict.get("goto", {}).get("target") if isinstance(verdict, dict) else None
                        obs.flags[b] = target
            elif name.startswith(SUSPECT_PREFIX):
                b = _backend_of_id(name[len(SUSPECT_PREFIX):])
                left = _expires(body)
                if b is not None and left is not None:
                    obs.suspect[b] = left
        elif "rule" in obj:
            rule = obj["rule"]
            obs.rules.setdefault(rule["chain"], []).append(rule)
    for rule in obs.rules.get(STEER_CHAIN, []):
        if any(isinstance(e, dict) and ("dnat" in e or "vmap" in e) for e in rule.get("expr", [])):
            obs.steer_handle = rule.get("handle")
            _check_steering(obs)
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

    def _backend_params(self, b: Backend) -> dict[str, Any]:
        return {**self._params(), "id": backend_id(b), "address": str(b.address), "port": b.port,
                "suspect_seconds": self._template.suspect_seconds}

    def _steer_rule(self, targets: tuple[Backend, ...], handle: int | None = None) -> dict[str, Any]:
        params = self._params()
        params["modulus"] = len(targets)
        params["slots"] = [[i, {"goto": {"target": f"{PICK_PREFIX}{i}"}}] for i in range(len(targets))]
        rule = self._template.render(self._template.steer_rule, params)
        if handle is not None:
            rule["rule"]["handle"] = handle
        return rule

    def _pick_rules(self, targets: tuple[Backend, ...], slot: int) -> list[dict[str, Any]]:
        """Slot `slot`'s chain: its backend unless flagged suspect, then every
        other backend in ring order unless flagged, then its backend anyway."""
        t, n = self._template, len(targets)
        rules = [t.render(t.pick_unless_suspect, {**self._backend_params(targets[(slot + k) % n]),
                                                  "slot": slot})
                 for k in range(n)]
        rules.append(t.render(t.pick_all_suspect, {**self._backend_params(targets[slot]), "slot": slot}))
        return rules

    def _steering_cmds(self, old: tuple[Backend, ...], new: tuple[Backend, ...],
                       handle: int | None) -> list[dict[str, Any]]:
        """The commands that change the steering from the slots `old` (as the
        kernel holds them; () for none) to `new`: one batch, so one atomic
        switch. Order matters inside the batch: objects are created before
        the rule that refers to them and deleted after it."""
        t = self._template
        ref = {"family": FAMILY, "table": self.table}
        cmds: list[dict[str, Any]] = []
        for b in new:  # each backend's flag (set) and the chain that raises it
            if b not in old:
                bp = self._backend_params(b)
                cmds += [{"add": t.render(obj, bp)}
                         for obj in (t.suspect_set, t.flag_chain, t.flag_rule, t.flag_element)]
        for i in range(len(new)):
            name = f"{PICK_PREFIX}{i}"
            if i < len(old):
                cmds.append({"flush": {"chain": {**ref, "name": name}}})
            else:
                cmds.append({"add": t.render(t.pick_chain, {**self._params(), "slot": i})})
            cmds += [{"add": r} for r in self._pick_rules(new, i)]
        if new and handle is not None:
            cmds.append({"replace": self._steer_rule(new, handle)})
        elif new:
            cmds.append({"add": self._steer_rule(new)})
        elif handle is not None:  # empty set: no DNAT, connects to 127.0.0.1:port are refused
            cmds.append({"delete": {"rule": {**ref, "chain": STEER_CHAIN, "handle": handle}}})
        for i in range(len(new), len(old)):
            cmds.append({"delete": {"chain": {**ref, "name": f"{PICK_PREFIX}{i}"}}})
        gone = [b for b in old if b not in new]
        if gone:
            cmds.append({"delete": {"element": {**ref, "name": FLAG_MAP, "elem": self._elements(gone)}}})
        for b in gone:
            cmds.append({"delete": {"chain": {**ref, "name": FLAG_PREFIX + backend_id(b)}}})
            cmds.append({"delete": {"set": {**ref, "name": SUSPECT_PREFIX + backend_id(b)}}})
        return cmds

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
            cmds.extend(self._steering_cmds((), targets, None))
        return cmds

    def _observe(self) -> _Observed | None:
        objs = _list(self._nft_handle(), {"table": {"family": FAMILY, "name": self.table}})
        return None if objs is None else _parse_table(objs)

    def _flag_rule_ok(self, obs: _Observed, b: Backend) -> bool:
        rules = obs.rules.get(FLAG_PREFIX + backend_id(b))
        if not rules or len(rules) != 1:
            return False
        for expr in rules[0].get("expr", []):
            st = expr.get("set") if isinstance(expr, dict) else None
            if isinstance(st, dict) and st.get("op") == "update":
                try:
                    timeout = st["elem"]["elem"]["timeout"]
                except (KeyError, TypeError):
                    return False
                return (st.get("set") == "@" + SUSPECT_PREFIX + backend_id(b)
                        and timeout == self._template.suspect_seconds)
        return False

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
        for name in t.sets:
            if name not in obs.sets:
                problems.append(f"set {name} missing")
        if obs.rules.get(STEER_CHAIN) and obs.steer_handle is None:
            problems.append("no DNAT rule in nat_output")
        elif obs.steer_handle is not None and obs.steer_targets is None:
            problems.append(f"DNAT rule unreadable ({obs.steer_problem})")
        elif obs.layout1:
            problems.append("DNAT rule of layout 1")
        # The steering's own objects: exactly those of the backends steered to.
        steered = () if obs.layout1 else (obs.steer_targets or ())
        picks = {f"{PICK_PREFIX}{i}" for i in range(len(steered))}
        own_flags = {FLAG_PREFIX + backend_id(b) for b in steered}
        for name, rules in obs.rules.items():
            if name in picks or name in own_flags:
                continue
            if name not in t.chains:
                problems.append(f"unexpected chain {name}")
                continue
            want = t.rule_counts.get(name, 0)
            extra = 1 if name == STEER_CHAIN else 0  # the DNAT rule; absent for an empty set
            if not want <= len(rules) <= want + extra:
                problems.append(f"chain {name}: {len(rules)} rules, want {want}")
        for name in obs.sets:
            if name.startswith(SUSPECT_PREFIX) and _backend_of_id(name[len(SUSPECT_PREFIX):]) not in steered:
                problems.append(f"unexpected set {name}")
        for b in steered:
            sset = obs.sets.get(SUSPECT_PREFIX + backend_id(b))
            if sset is None or "timeout" not in (sset.get("flags") or []):
                problems.append(f"suspect flag of {b} missing")
            if not self._flag_rule_ok(obs, b):
                problems.append(f"chain {FLAG_PREFIX}{backend_id(b)} missing or wrong")
        if obs.flags != {b: FLAG_PREFIX + backend_id(b) for b in steered}:
            problems.append(f"map {FLAG_MAP} does not match the steered backends")
        return problems

    def _update_cmds(self, obs: _Observed, targets: tuple[Backend, ...]) -> list[dict[str, Any]]:
        cmds: list[dict[str, Any]] = []
        if obs.steer_targets != targets and (targets or obs.steer_handle is not None):
            cmds += self._steering_cmds(obs.slot_order, targets, obs.steer_handle)
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
        counters = {b: BackendCounters(connections=pkts,
                                       extra={"refused": obs.refused.get(b, 0),
                                              "syn_timeouts": obs.syn_timeouts.get(b, 0),
                                              "established": obs.established.get(b, 0)})
                    for b, (pkts, _) in obs.counters.items()}
        return KernelState(
            datapath=self.name,
            installed=True,
            backends=obs.steer_targets or (),
            counters=counters,
            details={
                **base,
                "handles": {"dnat_rule": obs.steer_handle},
                "modulus": obs.modulus,
                "current_layout": not problems,
                "problems": problems,
                "marker": obs.marker,
                "cve_2020_8558_drops": obs.cve_drops,
                # Backends that refused (or did not answer) a steered connect within the last
                # suspect_window_s: new connects skip them (unless all are);
                # {"addr:port": seconds left}, whole seconds (rounded down).
                "suspect": {str(b): left for b, left in sorted(obs.suspect.items())},
                "suspect_window_s": self._template.suspect_seconds,
                "counters": "connections: new connections steered to the backend since it "
                            "entered the set; refused / established: steered connects the "
                            "backend answered with RST / SYN-ACK since the table was created; "
                            "syn_timeouts: SYNs of steered connects sent again (no answer "
                            "within the retransmission timeout)",
            },
        )

    def suspect_backends(self) -> dict[Backend, float]:
        """Backends the kernel currently avoids (their suspect sets, read
        only): backend -> seconds until the flag expires, whole seconds
        (rounded down). {} when not installed."""
        with self._lock:
            obs = self._observe()
        return {} if obs is None else dict(obs.suspect)

    def passive_failures(self) -> dict[Backend, PassiveCounts]:
        """Cumulative outcomes of steered connects per backend, counted in the
        kernel (nft/README.md): refused = the backend answered the SYN with
        RST, established = it answered with SYN-ACK (rule `handshake`),
        syn_timeouts = the client sent a SYN again, i.e. no answer within the
        retransmission timeout (rule in `filter_output`: a SYN of an entry that
        is already confirmed, so not the first one). Three `list set` calls
        (one libnftables call cannot list two sets); a backend appears at its
        first outcome and keeps its counts after it leaves the set. {} when
        no table of this layout is installed. A table from before the
        syn_timeouts set (same layout) reads as 0 there until replaced."""
        counts: dict[Backend, PassiveCounts] = {}
        with self._lock:
            nft = self._nft_handle()
            for name in (REFUSED_SET, ESTABLISHED_SET, SYN_TIMEOUTS_SET):
                objs = _list(nft, {"set": {"family": FAMILY, "table": self.table, "name": name}})
                if objs is None:
                    if name == SYN_TIMEOUTS_SET and counts:
                        continue  # a table of the previous template: no such set yet
                    return {}  # no table, or one of layout 1 (no such sets)
                for obj in objs:
                    body = obj.get("set")
                    if isinstance(body, dict) and body.get("name") == name:
                        for b, (n, _) in _counter_elements(body).items():
                            pc = counts.setdefault(b, PassiveCounts())
                            if name == REFUSED_SET:
                                pc.refused = n
                            elif name == ESTABLISHED_SET:
                                pc.established = n
                            else:
                                pc.syn_timeouts = n
        return counts

    def close_connections(self, backends: Sequence[Backend]) -> int:
        """Abort every connection this table DNATed to `backends` (IPv4 only:
        nothing else is steered here); returns how many client sockets were
        aborted. Their conntrack entries are deleted afterwards.

        Which sockets: the live TCP sockets of the host connected to
        127.0.0.1:PORT (a sock_diag dump filtered by port in the kernel; both
        families, since a dual-stack socket reaches it as ::ffff:127.0.0.1
        and its packets are IPv4), then each one's conntrack entry by exact
        tuple (one batch of CT_GET): DNATed to one of `backends` = ours. The
        sockets are found without a dump of the conntrack table: under
        connection churn it holds thousands of TIME_WAIT entries of closed
        sockets, and parsing them took 0.1-0.6 s of a failover. After the
        aborts, the entries of connects to `backends` that never got an answer
        and whose socket is gone are deleted too (a dump the kernel filters to
        DNATed, never-answered entries: few; on kernels before 5.15, which
        ignore the status filter, every DNATed entry comes back and is
        filtered here), so that no new connect reusing a source port follows
        one to a dead backend."""
        targets = {(b.address, b.port) for b in backends
                   if b.family == 4 and isinstance(b.address, ipaddress.IPv4Address)}
        if not targets:
            return 0
        _netlink = import_netlink()  # pyroute2: ~10 MB of RSS, so only on failover

        port = self.settings.listen_port
        live: list[tuple[Any, tuple[str, int, str, int]]] = []
        try:
            for family in (socket.AF_INET, socket.AF_INET6):
                for fs in _netlink.tcp_sockets(family, port):
                    src, dst = _netlink.unmapped(fs.sock.src), _netlink.unmapped(fs.sock.dst)
                    if dst != _LOOPBACK or src.version != 4:
                        continue
                    live.append((fs.sock, (str(src), fs.sock.sport, str(dst), port)))
        except (OSError, AttributeError, TypeError, ValueError) as e:  # netlink, or its decoding
            raise DatapathError(f"sock_diag dump failed: {e}") from e
        try:
            found = _netlink.entries_by_tuple([t for _, t in live])
        except (OSError, AttributeError, TypeError, ValueError) as e:  # netlink, or its decoding
            raise DatapathError(f"conntrack lookup failed: {e}") from e
        socks, ours = [], []
        for (sock, _), e in zip(live, found):
            if e is not None and e.status & _netlink.IPS_DST_NAT and (e.reply_src, e.reply_sport) in targets:
                socks.append(sock)
                ours.append(e)
        res = _netlink.DestroyResult()
        if socks:
            try:
                res = _netlink.destroy_sockets(socks)
            except OSError as e:
                raise DatapathError(f"sock_diag SOCK_DESTROY failed: {e}") from e
        # Entries of connects to these backends that never got an answer and
        # whose socket is gone (a client that gave up on a black hole): they
        # stay in SYN_SENT for 120 s, and conntrack takes the SYN of a new
        # connect that reuses the source port for a retransmission of the old
        # one, NATed to the dead backend. Few: a kernel-filtered dump.
        try:
            known = {(e.orig_src, e.orig_sport) for e in ours}
            ours += [e for e in _netlink.dnat_entries(str(_LOOPBACK), port, unanswered=True)
                     if (e.reply_src, e.reply_sport) in targets
                     and (e.orig_src, e.orig_sport) not in known]
        except (OSError, AttributeError, TypeError, ValueError) as e:
            log.warning("conntrack dump of unanswered connects failed: %s", e)
        # After the sockets: an established one's RST still needs its entry for NAT.
        try:
            deleted = _netlink.delete_entries(ours)
        except (OSError, AttributeError, TypeError, ValueError) as e:
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
