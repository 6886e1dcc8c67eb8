"""The nftables data path's plan, pure: what the kernel should hold (the
template nft/ruleset.json filled in for one table, listen port and backend
set) as the libnftables JSON commands of one transaction, and the reverse, a
`list table` listing parsed back into what the kernel holds.

No I/O: prism_kernel.datapath.nft executes the plans and reads the listings;
tests/test_nft_plan.py checks them against a fake kernel. nft/README.md
explains every rule; docs/design/nft-datapath.md the choices.

Invariants of every plan:
- One plan is one batch, i.e. one nf_tables transaction: all or nothing.
- The steering path (nat_output -> steer -> pick_i) holds no map. A set
  change flushes and refills chains; a packet still walking the previous
  generation's rules reads only chains, never a map element the transaction
  deactivated (docs/design/nft-set-change-race.md).
- Objects are created before the rules that refer to them, deleted after.
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from prism_kernel.core.model import Backend
from prism_kernel.errors import DatapathError

FAMILY = "ip"
MARKER_PREFIX = "prism-kernel nftables"
NAT_OUTPUT = "nat_output"
STEER_CHAIN = "steer"
MARKER_CHAIN = "nat_postrouting"  # its first rule's comment is the table's marker
CVE_CHAIN = "filter_prerouting"
COUNTER_SET = "backends"
OUTCOMES_SET = "outcomes"
FLAG_MAP = "flag"
PICK_PREFIX = "pick_"
SUSPECT_PREFIX = "suspect_"
FLAG_PREFIX = "flag_"
# The one TCP flag each rule updating the set `outcomes` keeps of the packet
# (`tcp flags & rst` and so on): which outcome an element counts. One flag,
# never a combination: libnftables 1.0.6 aborts listing a set whose
# elements hold combined flags (mergesort.c, concat_expr_msort_value).
_OUTCOME_FLAG = {"rst": 0, "ack": 1, "syn": 2}  # index into Outcomes
_LOOPBACK = ipaddress.IPv4Address("127.0.0.1")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_PLACEHOLDER = re.compile(r"\$\{([a-z_]+)\}")
Command = dict[str, Any]


def table_name(instance: str) -> str:
    """nft table name for an instance: "prism-kernel" -> "prism_kernel"."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", instance)
    if not name or not name[0].isalpha():
        name = "pk_" + name
    return name[:64]


def backend_id(b: Backend) -> str:
    """The name part of a backend's own objects: 198.18.1.2:8080 -> "198_18_1_2_8080"."""
    return f"{str(b.address).replace('.', '_')}_{b.port}"


def backend_of_id(ident: str) -> Backend | None:
    parts = ident.split("_")
    if len(parts) != 5 or not all(p.isdigit() for p in parts):
        return None
    try:
        return Backend.of(".".join(parts[:4]), int(parts[4]))
    except ValueError:
        return None


def steerable(backends: Iterable[Backend], listen_port: int) -> tuple[tuple[Backend, ...], tuple[Backend, ...]]:
    """(the IPv4 set to steer to, sorted; the IPv6 backends left out: IPv6
    has no route_localnet, a connect from ::1 cannot be DNATed off the host).
    DatapathError on bad input, before anything is written."""
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
        if a == _LOOPBACK and b.port == listen_port:
            raise DatapathError(f"backend {b} is the listen address itself")
        v4.add(b)
    return tuple(sorted(v4)), tuple(sorted(v6))


# --------------------------------------------------------------------------
# The template


class Template:
    """nft/ruleset.json, parsed and checked (its file is read by the data path)."""

    def __init__(self, raw: dict[str, Any], source: str):
        self.source = source
        try:
            self.layout = int(raw["layout"])
            self.table = raw["table"]
            self.objects: list[dict[str, Any]] = list(raw["objects"])
            self.draw_rule: dict[str, Any] = raw["steer_rules"]["draw"]
            self.last_rule: dict[str, Any] = raw["steer_rules"]["last"]
            self.pick_chain: dict[str, Any] = raw["pick_chain"]
            self.pick_unless_suspect: dict[str, Any] = raw["pick_rules"]["unless_suspect"]
            self.pick_all_suspect: dict[str, Any] = raw["pick_rules"]["all_suspect"]
            per_backend = raw["per_backend"]
            self.per_backend = [per_backend[k] for k in ("set", "chain", "rule", "element")]
            self.suspect_seconds = int(raw["suspect_seconds"])
        except (KeyError, TypeError, ValueError) as e:
            raise DatapathError(f"nft template {source}: missing or bad key {e}") from e
        canon = json.dumps({k: v for k, v in raw.items() if k != "about"}, sort_keys=True,
                           separators=(",", ":"))
        self.digest = hashlib.sha256(canon.encode()).hexdigest()[:12]
        # A current table: these chains (with their rule counts) and sets,
        # plus the steering's own chains and sets, checked against `steer`.
        self.chains: dict[str, dict[str, Any]] = {}
        self.rule_counts: dict[str, int] = {}
        self.sets: set[str] = set()
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
                self.sets.add(body["name"])
            else:
                raise DatapathError(f"nft template {source}: unsupported object {kind!r}")
        for needed in (NAT_OUTPUT, STEER_CHAIN, MARKER_CHAIN, CVE_CHAIN):
            if needed not in self.chains:
                raise DatapathError(f"nft template {source}: chain {needed!r} missing")
        for needed in (COUNTER_SET, OUTCOMES_SET, FLAG_MAP):
            if needed not in self.sets:
                raise DatapathError(f"nft template {source}: set {needed!r} missing")

    def render(self, value: Any, params: dict[str, Any]) -> Any:
        """Deep copy of `value` with ${name} placeholders filled in: a string
        that is exactly ${name} becomes the value itself (typed)."""
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


# --------------------------------------------------------------------------
# What the kernel holds


class Outcomes(NamedTuple):
    """Steered connects per backend as the kernel counted them."""

    refused: int = 0  # answered with RST
    established: int = 0  # answered with SYN-ACK
    syn_timeouts: int = 0  # the client sent its SYN again


@dataclass
class TableState:
    """A `list table` listing, parsed."""

    marker: str | None = None
    chains: dict[str, dict[str, Any]] = field(default_factory=dict)
    rules: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    sets: dict[str, dict[str, Any]] = field(default_factory=dict)  # named sets and maps
    slot_order: tuple[Backend, ...] | None = None  # the steering, slot by slot; None: unreadable
    steer_problem: str | None = None  # why slot_order is None
    listed: tuple[Backend, ...] = ()  # the elements of set `backends` (every layout has it)
    connections: dict[Backend, int] = field(default_factory=dict)  # its counters
    outcomes: dict[Backend, Outcomes] = field(default_factory=dict)
    flags: dict[Backend, str | None] = field(default_factory=dict)  # map `flag`: backend -> goto chain
    suspect: dict[Backend, float] = field(default_factory=dict)  # flagged backend -> seconds left
    cve_drops: int | None = None

    @property
    def backends(self) -> tuple[Backend, ...]:
        """What the table steers to (sorted): the steering when readable,
        else what its counter set lists (an older layout, or damage)."""
        return tuple(sorted(self.slot_order)) if self.slot_order is not None else self.listed


def _concat_backend(value: Any) -> Backend | None:
    try:
        addr, port = value["concat"][:2]
        return Backend.of(addr, int(port))
    except (KeyError, TypeError, ValueError):
        return None


def _elements(body: dict[str, Any]) -> list[tuple[Any, dict[str, Any]]]:
    """(key, counter) of each listed element of a set."""
    out = []
    for elem in body.get("elem") or []:
        if isinstance(elem, dict) and "elem" in elem:
            out.append((elem["elem"].get("val"), elem["elem"].get("counter") or {}))
        else:
            out.append((elem, {}))
    return out


def _map_entries(entries: Any) -> list[Any]:
    """The [key, value] pairs of a map as listed (a one-element map may come back unwrapped)."""
    if isinstance(entries, list) and len(entries) == 2 and not isinstance(entries[0], list):
        entries = [entries]
    return entries if isinstance(entries, list) else []


def parse_outcomes(body: dict[str, Any]) -> dict[Backend, Outcomes]:
    """The set `outcomes` (key: backend . one TCP flag, a counter each) as
    counts per backend: rst = refused, ack = established (the SYN-ACK),
    syn = syn_timeouts (the client's SYN sent again)."""
    out: dict[Backend, list[int]] = {}
    for key, counter in _elements(body):
        b = _concat_backend(key)
        try:
            kind = _OUTCOME_FLAG.get(key["concat"][2])
        except (KeyError, TypeError, IndexError):
            continue
        if b is not None and kind is not None:
            out.setdefault(b, [0, 0, 0])[kind] += int(counter.get("packets", 0))
    return {b: Outcomes(*n) for b, n in out.items()}


def _suspect_left(body: dict[str, Any]) -> float | None:
    """Seconds until a suspect set's element expires (whole seconds, rounded
    down by libnftables); None when it has none (expired ones are not listed)."""
    left = None
    for elem in body.get("elem") or []:
        e = elem.get("elem") if isinstance(elem, dict) else None
        left = max(left or 0.0, float((e or {}).get("expires", 0) or 0))
    return left


def _parse_draw(rule: dict[str, Any]) -> tuple[int | None, str | None]:
    """(modulus or None, goto target) of a rule of chain `steer`; target None
    when the rule is anything else."""
    mod, target = None, None
    for expr in rule.get("expr", []):
        m = expr.get("match") if isinstance(expr, dict) else None
        if isinstance(m, dict) and "numgen" in (m.get("left") or {}) and m.get("right") == 0:
            mod = int(m["left"]["numgen"].get("mod", -1))
        elif isinstance(expr, dict) and "goto" in expr:
            target = expr["goto"].get("target")
        else:
            return None, None
    return mod, target


def _parse_pick(rule: dict[str, Any]) -> tuple[str | None, Backend | None]:
    """(suspect set looked up, DNAT target) of a pick chain's rule."""
    suspect, target = None, None
    for expr in rule.get("expr", []):
        m = expr.get("match") if isinstance(expr, dict) else None
        if isinstance(m, dict) and isinstance(m.get("right"), str) and m["right"].startswith("@"):
            suspect = m["right"][1:] if m.get("op") == "!=" else "?"
        d = expr.get("dnat") if isinstance(expr, dict) else None
        if isinstance(d, dict):
            try:
                target = Backend.of(d["addr"], int(d["port"]))
            except (KeyError, TypeError, ValueError):
                target = None
    return suspect, target


def _parse_steering(st: TableState) -> None:
    """st.slot_order from chain `steer` and the pick chains, or st.steer_problem
    when they are not what a plan writes."""
    if STEER_CHAIN not in st.chains:
        st.steer_problem = f"no chain {STEER_CHAIN}"
        return
    draws = [_parse_draw(r) for r in st.rules.get(STEER_CHAIN, [])]
    n = len(draws)
    want = [(n - k if k < n - 1 else None, f"{PICK_PREFIX}{k}") for k in range(n)]
    if draws != want:
        st.steer_problem = f"chain {STEER_CHAIN} is not the draw of {n} slots"
        return
    picks = [[_parse_pick(r) for r in st.rules.get(f"{PICK_PREFIX}{i}", [])] for i in range(n)]
    order = [p[-1][1] if p and p[-1][0] is None else None for p in picks]
    if None in order or len(set(order)) != n:
        st.steer_problem = "pick chains do not each end in a DNAT to their own backend"
        return
    for i in range(n):
        ring = [order[(i + k) % n] for k in range(n)]
        if picks[i] != [(SUSPECT_PREFIX + backend_id(b), b) for b in ring] + [(None, order[i])]:
            st.steer_problem = f"chain {PICK_PREFIX}{i} is not the fallback order of slot {i}"
            return
    st.slot_order = tuple(order)  # type: ignore[arg-type]


def parse_table(objects: Sequence[dict[str, Any]]) -> TableState:
    """What the kernel holds, from the objects of `list table` (JSON)."""
    st = TableState()
    for obj in objects:
        if "chain" in obj:
            st.chains[obj["chain"]["name"]] = obj["chain"]
            st.rules.setdefault(obj["chain"]["name"], [])
        elif "rule" in obj:
            st.rules.setdefault(obj["rule"]["chain"], []).append(obj["rule"])
        elif "set" in obj or "map" in obj:
            body = obj.get("set") or obj.get("map")
            name = body.get("name", "")
            st.sets[name] = body
            if name == COUNTER_SET:
                for key, counter in _elements(body):
                    b = _concat_backend(key)
                    if b is not None:
                        st.connections[b] = int(counter.get("packets", 0))
                st.listed = tuple(sorted(st.connections))
            elif name == OUTCOMES_SET:
                st.outcomes = parse_outcomes(body)
            elif name == FLAG_MAP:
                for entry in _map_entries(body.get("elem")):
                    if isinstance(entry, list) and len(entry) == 2 and _concat_backend(entry[0]):
                        verdict = entry[1] if isinstance(entry[1], dict) else {}
                        st.flags[_concat_backend(entry[0])] = (verdict.get("goto") or {}).get("target")
            elif name.startswith(SUSPECT_PREFIX):
                b, left = backend_of_id(name[len(SUSPECT_PREFIX):]), _suspect_left(body)
                if b is not None and left is not None:
                    st.suspect[b] = left
    marker_rules = st.rules.get(MARKER_CHAIN) or []
    st.marker = marker_rules[0].get("comment") if marker_rules else None
    for rule in st.rules.get(CVE_CHAIN, []):
        for expr in rule.get("expr", []):
            if isinstance(expr, dict) and isinstance(expr.get("counter"), dict):
                st.cve_drops = int(expr["counter"].get("packets", 0))
    _parse_steering(st)
    return st


# --------------------------------------------------------------------------
# The commands


@dataclass(frozen=True)
class Plan:
    """What to write: one transaction (`commands`, [] = nothing), and the set
    the kernel steers to once it is committed."""

    action: str  # "create" | "adopt" | "replace" | "update" | "nothing"
    commands: list[Command]
    backends: tuple[Backend, ...]
    problems: tuple[str, ...] = ()  # why a table is replaced


class Planner:
    """The plans for one table (instance) and listen port."""

    def __init__(self, template: Template, table: str, listen_port: int):
        self.t, self.table, self.listen_port = template, table, listen_port
        self.marker = (f"{MARKER_PREFIX} layout={template.layout} template={template.digest} "
                       f"listen=127.0.0.1:{listen_port}")
        self._ref = {"family": FAMILY, "table": table}

    def _params(self, **more: Any) -> dict[str, Any]:
        return {"table": self.table, "listen_port": self.listen_port, "marker": self.marker, **more}

    def _backend_params(self, b: Backend, **more: Any) -> dict[str, Any]:
        return self._params(id=backend_id(b), address=str(b.address), port=b.port,
                            suspect_seconds=self.t.suspect_seconds, **more)

    @staticmethod
    def _keys(backends: Iterable[Backend]) -> list[dict[str, Any]]:
        return [{"concat": [str(b.address), b.port]} for b in backends]

    def pick_rules(self, slots: Sequence[Backend], i: int) -> list[Command]:
        """Slot i's chain: its backend unless flagged suspect, then every other
        backend in ring order unless flagged, then its own backend anyway."""
        t, n = self.t, len(slots)
        rules = [t.render(t.pick_unless_suspect, self._backend_params(slots[(i + k) % n], slot=i))
                 for k in range(n)]
        return rules + [t.render(t.pick_all_suspect, self._backend_params(slots[i], slot=i))]

    def draw_rules(self, n: int) -> list[Command]:
        """Chain `steer` for n slots: rule k sends the connect to slot k with
        probability 1/(n-k), the last one takes what is left, so every slot
        gets 1/n. Several rules instead of one `numgen ... vmap`: a map here
        is what lost connects during a set change."""
        t = self.t
        return [t.render(t.draw_rule if k < n - 1 else t.last_rule,
                         self._params(slot=k, modulus=n - k)) for k in range(n)]

    def steering(self, old: Sequence[Backend], new: Sequence[Backend]) -> list[Command]:
        """From the slots `old` (as the kernel holds them; () for none) to `new`."""
        t, ref = self.t, self._ref
        cmds: list[Command] = []
        for b in new:  # a new backend's suspect flag, the chain raising it, its `flag` entry
            if b not in old:
                cmds += [{"add": t.render(obj, self._backend_params(b))} for obj in t.per_backend]
        for i in range(len(new)):
            if i < len(old):
                cmds.append({"flush": {"chain": {**ref, "name": f"{PICK_PREFIX}{i}"}}})
            else:
                cmds.append({"add": t.render(t.pick_chain, self._params(slot=i))})
            cmds += [{"add": r} for r in self.pick_rules(new, i)]
        if old:
            cmds.append({"flush": {"chain": {**ref, "name": STEER_CHAIN}}})
        cmds += [{"add": r} for r in self.draw_rules(len(new))]
        cmds += [{"delete": {"chain": {**ref, "name": f"{PICK_PREFIX}{i}"}}}
                 for i in range(len(new), len(old))]
        gone = [b for b in old if b not in new]
        if gone:
            cmds.append({"delete": {"element": {**ref, "name": FLAG_MAP, "elem": self._keys(gone)}}})
        for b in gone:
            cmds.append({"delete": {"chain": {**ref, "name": FLAG_PREFIX + backend_id(b)}}})
            cmds.append({"delete": {"set": {**ref, "name": SUSPECT_PREFIX + backend_id(b)}}})
        return cmds

    def create(self, backends: tuple[Backend, ...], replace: bool = False) -> list[Command]:
        """The whole table; with `replace`, deleting the one there first in
        the same batch (one switch, no moment without a table)."""
        t, params = self.t, self._params()
        cmds: list[Command] = []
        if replace:
            cmds.append({"delete": {"table": {"family": FAMILY, "name": self.table}}})
        cmds.append({"add": {"table": t.render(t.table, params)}})
        cmds += [{"add": t.render(obj, params)} for obj in t.objects]
        if backends:
            cmds.append({"add": {"element": {**self._ref, "name": COUNTER_SET, "elem": self._keys(backends)}}})
            cmds += self.steering((), backends)
        return cmds

    def update(self, st: TableState, backends: tuple[Backend, ...]) -> list[Command]:
        """A current table to `backends`; [] when it holds them already.
        Counter elements: only the changed ones, so the others keep counting."""
        cmds: list[Command] = []
        old = st.slot_order or ()
        if tuple(sorted(old)) != backends:
            cmds += self.steering(old, backends)
        have, want = set(st.connections), set(backends)
        if have - want:
            cmds.append({"delete": {"element": {**self._ref, "name": COUNTER_SET,
                                                "elem": self._keys(sorted(have - want))}}})
        if want - have:
            cmds.append({"add": {"element": {**self._ref, "name": COUNTER_SET,
                                             "elem": self._keys(sorted(want - have))}}})
        return cmds

    @staticmethod
    def cleanup_commands(table: str) -> list[Command]:
        return [{"delete": {"table": {"family": FAMILY, "name": table}}}]

    def problems(self, st: TableState) -> list[str]:
        """Why a table is not one this planner writes ([] = it is)."""
        t, out = self.t, []
        if st.marker != self.marker:
            out.append(f"marker {st.marker!r}, want {self.marker!r}")
        for name, spec in t.chains.items():
            have = st.chains.get(name)
            if have is None:
                out.append(f"chain {name} missing")
                continue
            out += [f"chain {name}: {key} {have.get(key)!r}, want {spec.get(key)!r}"
                    for key in ("type", "hook", "prio", "policy") if spec.get(key) != have.get(key)]
        out += [f"set {name} missing" for name in sorted(t.sets) if name not in st.sets]
        if st.slot_order is None:
            out.append(f"steering unreadable ({st.steer_problem})")
        steered = st.slot_order or ()
        own = {f"{PICK_PREFIX}{i}" for i in range(len(steered))}
        own |= {FLAG_PREFIX + backend_id(b) for b in steered}
        for name, rules in st.rules.items():
            if name in own or name == STEER_CHAIN:
                continue
            if name not in t.chains:
                out.append(f"unexpected chain {name}")
            elif len(rules) != t.rule_counts.get(name, 0):
                out.append(f"chain {name}: {len(rules)} rules, want {t.rule_counts.get(name, 0)}")
        out += [f"unexpected set {name}" for name in st.sets if name.startswith(SUSPECT_PREFIX)
                and backend_of_id(name[len(SUSPECT_PREFIX):]) not in steered]
        for b in steered:
            sset = st.sets.get(SUSPECT_PREFIX + backend_id(b))
            if sset is None or "timeout" not in (sset.get("flags") or []):
                out.append(f"suspect flag of {b} missing")
            if not self._flag_rule_ok(st, b):
                out.append(f"chain {FLAG_PREFIX}{backend_id(b)} missing or wrong")
        if st.flags != {b: FLAG_PREFIX + backend_id(b) for b in steered}:
            out.append(f"map {FLAG_MAP} does not match the steered backends")
        return out

    def _flag_rule_ok(self, st: TableState, b: Backend) -> bool:
        """The backend's flag chain: one rule raising its own flag for the
        template's window."""
        rules = st.rules.get(FLAG_PREFIX + backend_id(b))
        if not rules or len(rules) != 1:
            return False
        for expr in rules[0].get("expr", []):
            upd = expr.get("set") if isinstance(expr, dict) else None
            if isinstance(upd, dict) and upd.get("op") == "update":
                try:
                    timeout = upd["elem"]["elem"]["timeout"]
                except (KeyError, TypeError):
                    return False
                return (upd.get("set") == "@" + SUSPECT_PREFIX + backend_id(b)
                        and timeout == self.t.suspect_seconds)
        return False

    def carried(self, st: TableState, wanted: tuple[Backend, ...]) -> tuple[Backend, ...]:
        """The set a table being replaced steered to (kept, so a replacement
        changes nothing for clients), else `wanted`."""
        keep = tuple(b for b in st.backends if b.family == 4 and not (
            b.address == _LOOPBACK and b.port == self.listen_port))
        return keep or wanted

    def install(self, st: TableState | None, wanted: tuple[Backend, ...]) -> Plan:
        """Start: create the table, adopt a current one as it is (writing
        nothing, `wanted` not applied), or replace an older or damaged one
        keeping what it steered to."""
        if st is None:
            return Plan("create", self.create(wanted), wanted)
        problems = self.problems(st)
        if not problems:
            return Plan("adopt", [], st.backends)
        keep = self.carried(st, wanted)
        return Plan("replace", self.create(keep, replace=True), keep, tuple(problems))

    def apply(self, st: TableState | None, wanted: tuple[Backend, ...]) -> Plan:
        """Steer to `wanted`: the changes only, or the whole table when it is
        missing or damaged."""
        if st is None:
            return Plan("create", self.create(wanted), wanted)
        problems = self.problems(st)
        if problems:
            return Plan("replace", self.create(wanted, replace=True), wanted, tuple(problems))
        cmds = self.update(st, wanted)
        return Plan("update" if cmds else "nothing", cmds, wanted)
