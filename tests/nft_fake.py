"""A fake nf_tables for the nftables plans (prism_kernel.core.nft_plan), in the
spirit of knftables.Fake: it applies libnftables JSON commands to tables in
memory, all or nothing, with the checks of the kernel that a plan in the wrong
order would hit (a rule naming a chain or set that does not exist, deleting a
chain or set something still refers to, deleting what is not there), and
lists a table as `nft -j list table` does, in the parts parse_table() reads.
test_datapath_nftables.py::test_the_fake_lists_what_the_kernel_lists checks
that the kernel parses to the same.

describe() turns a command into one short line for assertions that read like
an `nft -f` file.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any


class Rejected(Exception):
    """The kernel would refuse the batch (nothing of it applied)."""


@dataclass
class _Set:
    body: dict[str, Any]
    elems: list[Any] = field(default_factory=list)  # keys; [key, data] for a map
    dynamic: list[dict[str, Any]] = field(default_factory=list)  # elements listed as the packet path left them

    @property
    def is_map(self) -> bool:
        return "map" in self.body

    def key(self, elem: Any) -> str:
        """An element's key (a map element is [key, data]; deleting names the key only)."""
        pair = self.is_map and isinstance(elem, list) and len(elem) == 2
        return json.dumps(elem[0] if pair else elem, sort_keys=True)


@dataclass
class _Table:
    name: str
    chains: dict[str, dict[str, Any]] = field(default_factory=dict)
    rules: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    sets: dict[str, _Set] = field(default_factory=dict)


def _refs(value: Any, chains: set[str], sets: set[str]) -> None:
    """Chains (jump/goto) and named sets (@name) an expression refers to."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k in ("jump", "goto") and isinstance(v, dict):
                chains.add(v["target"])
            else:
                _refs(v, chains, sets)
    elif isinstance(value, list):
        for v in value:
            _refs(v, chains, sets)
    elif isinstance(value, str) and value.startswith("@"):
        sets.add(value[1:])


class FakeNft:
    def __init__(self) -> None:
        self.tables: dict[str, _Table] = {}
        self.handle = 0
        self.last: list[dict[str, Any]] = []  # the last batch applied

    # -- writing ------------------------------------------------------------

    def run(self, cmds: list[dict[str, Any]]) -> None:
        saved = copy.deepcopy((self.tables, self.handle))
        try:
            for cmd in cmds:
                (verb, obj), = cmd.items()
                (kind, body), = obj.items()
                getattr(self, f"_{verb}_{kind}")(body)
        except Rejected:
            self.tables, self.handle = saved
            raise
        self.last = cmds

    def _next(self) -> int:
        self.handle += 1
        return self.handle

    def _table(self, body: dict[str, Any]) -> _Table:
        name = body.get("table", body.get("name"))
        if name not in self.tables:
            raise Rejected(f"no table {name}")
        return self.tables[name]

    def _used(self, t: _Table) -> tuple[set[str], set[str]]:
        chains: set[str] = set()
        sets: set[str] = set()
        for rules in t.rules.values():
            _refs(rules, chains, sets)
        for s in t.sets.values():
            if s.is_map:
                _refs([e[1] for e in s.elems], chains, sets)
        return chains, sets

    def _add_table(self, body: dict[str, Any]) -> None:
        self.tables.setdefault(body["name"], _Table(body["name"]))

    def _delete_table(self, body: dict[str, Any]) -> None:
        self._table(body)
        del self.tables[body["name"]]

    def _add_chain(self, body: dict[str, Any]) -> None:
        t = self._table(body)
        if body["name"] not in t.chains:
            t.chains[body["name"]] = {**body, "handle": self._next()}
            t.rules[body["name"]] = []

    def _flush_chain(self, body: dict[str, Any]) -> None:
        t = self._table(body)
        if body["name"] not in t.chains:
            raise Rejected(f"no chain {body['name']}")
        t.rules[body["name"]] = []

    def _delete_chain(self, body: dict[str, Any]) -> None:
        t = self._table(body)
        if body["name"] not in t.chains:
            raise Rejected(f"no chain {body['name']}")
        del t.rules[body["name"]]  # its own rules go with it
        if body["name"] in self._used(t)[0]:
            raise Rejected(f"chain {body['name']} is still referenced")
        del t.chains[body["name"]]

    def _add_rule(self, body: dict[str, Any]) -> None:
        t = self._table(body)
        if body["chain"] not in t.chains:
            raise Rejected(f"no chain {body['chain']}")
        chains: set[str] = set()
        sets: set[str] = set()
        _refs(body["expr"], chains, sets)
        if chains - set(t.chains) or sets - set(t.sets):
            raise Rejected(f"rule refers to missing {sorted(chains - set(t.chains))} {sorted(sets - set(t.sets))}")
        rule = {k: v for k, v in body.items() if k != "handle"}
        t.rules[body["chain"]].append({**rule, "handle": self._next()})

    def _add_set(self, body: dict[str, Any]) -> None:
        t = self._table(body)
        t.sets.setdefault(body["name"], _Set({**body, "handle": self._next()}))

    _add_map = _add_set

    def _delete_set(self, body: dict[str, Any]) -> None:
        t = self._table(body)
        if body["name"] not in t.sets:
            raise Rejected(f"no set {body['name']}")
        if body["name"] in self._used(t)[1]:
            raise Rejected(f"set {body['name']} is still referenced")
        del t.sets[body["name"]]

    def _elem_set(self, body: dict[str, Any]) -> _Set:
        t = self._table(body)
        if body["name"] not in t.sets:
            raise Rejected(f"no set {body['name']}")
        return t.sets[body["name"]]

    def _add_element(self, body: dict[str, Any]) -> None:
        s = self._elem_set(body)
        if s.is_map:
            chains: set[str] = set()
            _refs([e[1] for e in body["elem"]], chains, set())
            missing = chains - set(self._table(body).chains)
            if missing:
                raise Rejected(f"element refers to missing chains {sorted(missing)}")
        have = {s.key(e) for e in s.elems}
        s.elems += [e for e in body["elem"] if s.key(e) not in have]

    def _delete_element(self, body: dict[str, Any]) -> None:
        s = self._elem_set(body)
        gone = {s.key(e) for e in body["elem"]}
        if gone - {s.key(e) for e in s.elems}:
            raise Rejected(f"no such element in {body['name']}")
        s.elems = [e for e in s.elems if s.key(e) not in gone]

    # -- reading ------------------------------------------------------------

    def list_table(self, name: str) -> list[dict[str, Any]] | None:
        """The objects `nft -j list table ip NAME` gives (None: no such table)."""
        t = self.tables.get(name)
        if t is None:
            return None
        out: list[dict[str, Any]] = [{"table": {"family": "ip", "name": name}}]
        for s in t.sets.values():
            body = {k: v for k, v in s.body.items()}
            counted = any("counter" in st for st in body.get("stmt") or [])
            elems = [{"elem": {"val": e, "counter": {"packets": 0, "bytes": 0}}} if counted else e
                     for e in s.elems] + s.dynamic
            if elems:
                body["elem"] = elems
            out.append({"map" if s.is_map else "set": body})
        out += [{"chain": c} for c in t.chains.values()]
        out += [{"rule": r} for c in t.chains for r in t.rules[c]]
        return out


# -- describe ---------------------------------------------------------------


def _expr(e: Any) -> str:
    if isinstance(e, (str, int)):
        return str(e)
    if not isinstance(e, dict):
        return json.dumps(e)
    (k, v), = e.items()
    if k == "match":
        op = "" if v["op"] in ("==", "in") else f"{v['op']} "
        return f"{_expr(v['left'])} {op}{_expr(v['right'])}"
    if k in ("payload",):
        return f"{v.get('protocol', v.get('base'))} {v.get('field', v.get('offset'))}"
    if k == "numgen":
        return f"numgen {v['mode']} mod {v['mod']}"
    if k in ("jump", "goto"):
        return f"{k} {v['target']}"
    if k == "dnat":
        return f"dnat to {v['addr']}:{v['port']}"
    if k == "meta":
        return f"meta {v['key']}"
    if k == "ct":
        return f"ct {v.get('dir', '')} {v['key']}".replace("  ", " ")
    if k == "concat":
        return " . ".join(_expr(x) for x in v)
    if k == "set" and isinstance(v, dict):
        return f"update {v['set']}"
    if k == "&":
        return f"{_expr(v[0])} & {_expr(v[1])}"
    if v is None:
        return k
    return json.dumps(e, sort_keys=True)


def _elem(e: Any) -> str:
    if isinstance(e, list) and len(e) == 2:
        return f"{_elem(e[0])} : {_expr(e[1])}"
    if isinstance(e, dict) and "concat" in e:
        return " . ".join(str(x) for x in e["concat"])
    return json.dumps(e)


def describe(cmd: dict[str, Any]) -> str:
    """`add rule ip t steer numgen random mod 2 0 goto pick_0` and the like."""
    (verb, obj), = cmd.items()
    (kind, body), = obj.items()
    table = body.get("table", body.get("name"))
    if kind == "table":
        return f"{verb} table ip {body['name']}"
    if kind == "rule":
        return f"{verb} rule ip {table} {body['chain']} " + " ".join(_expr(e) for e in body["expr"])
    if kind == "element":
        return f"{verb} element ip {table} {body['name']} {{ " + ", ".join(_elem(e) for e in body["elem"]) + " }"
    return f"{verb} {kind} ip {table} {body['name']}"
