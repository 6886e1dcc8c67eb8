"""The nftables plans (prism_kernel.core.nft_plan), without root or kernel:
the commands for a fresh install, adoption, a set change, an older layout
replaced, a damaged table, cleanup, checked against a fake nf_tables
(tests/nft_fake.py, in the spirit of kube-proxy's proxier tests against
knftables.Fake), and the listings parsed back. What only the kernel can show
stays in tests/test_datapath_nftables.py."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest

from prism_kernel.core.model import Backend
from prism_kernel.core.nft_plan import (
    Outcomes,
    Planner,
    Template,
    backend_id,
    parse_table,
    steerable,
    table_name,
)
from prism_kernel.errors import DatapathError
from tests.nft_fake import FakeNft, Rejected, describe

REPO = Path(__file__).resolve().parents[1]
TPL = Template(json.loads((REPO / "nft" / "ruleset.json").read_text()), "nft/ruleset.json")
T, PORT = "pk_test", 7445
A, B, C = (Backend.of(f"198.18.{i}.2", 6443) for i in (1, 2, 3))
LOCAL = Backend.of("127.0.0.1", 6443)
P = Planner(TPL, T, PORT)


def lines(cmds) -> list[str]:
    return [describe(c) for c in cmds]


def kernel(*backends: Backend, planner: Planner = P) -> FakeNft:
    fake = FakeNft()
    fake.run(planner.create(tuple(backends)))
    return fake


def state(fake: FakeNft):
    objs = fake.list_table(T)
    return None if objs is None else parse_table(objs)


def ids(*bs: Backend) -> list[str]:
    return [backend_id(b) for b in bs]


def per_backend(b: Backend) -> list[str]:
    i = backend_id(b)
    return [f"add set ip {T} suspect_{i}", f"add chain ip {T} flag_{i}",
            f"add rule ip {T} flag_{i} ct protocol tcp update @suspect_{i}",
            f"add element ip {T} flag {{ {b.address} . {b.port} : goto flag_{i} }}"]


def pick(slot: int, ring: list[Backend]) -> list[str]:
    rules = [f"add rule ip {T} pick_{slot} tcp dport != @suspect_{backend_id(b)} dnat to {b.address}:{b.port}"
             for b in ring]
    return rules + [f"add rule ip {T} pick_{slot} meta l4proto tcp dnat to {ring[0].address}:{ring[0].port}"]


def maps_in(rule_cmds) -> list[str]:
    """Rules in the steering path that look a packet up in a map (vmap / map):
    what let connects through un-DNATed during a set change."""
    bad = []
    for c in rule_cmds:
        rule = (c.get("add") or c.get("replace") or {}).get("rule")
        if rule and rule["chain"] in {"nat_output", "steer"} | {f"pick_{i}" for i in range(64)}:
            text = json.dumps(rule["expr"])
            if '"vmap"' in text or '"map"' in text:
                bad.append(describe(c))
    return bad


# --- fresh install, adoption, no change --------------------------------------------


def test_fresh_install_is_one_batch_with_the_steering_last():
    plan = P.install(None, (A, B))
    assert plan.action == "create" and plan.backends == (A, B)
    got = lines(plan.commands)
    base = 1 + len(TPL.objects)  # the table, then the template's objects in order
    assert got[0] == f"add table ip {T}"
    assert got[1:base] == lines({"add": TPL.render(o, P._params())} for o in TPL.objects)
    assert got[base:] == [
        f"add element ip {T} backends {{ {A.address} . 6443, {B.address} . 6443 }}",
        *per_backend(A), *per_backend(B),
        f"add chain ip {T} pick_0", *pick(0, [A, B]),
        f"add chain ip {T} pick_1", *pick(1, [B, A]),
        f"add rule ip {T} steer numgen random mod 2 0 goto pick_0",
        f"add rule ip {T} steer goto pick_1",
    ]
    fake = FakeNft()
    fake.run(plan.commands)
    st = state(fake)
    assert st.slot_order == (A, B) and st.listed == (A, B) and P.problems(st) == []
    assert st.marker == P.marker and f"layout={TPL.layout} " in st.marker


def test_a_current_table_is_adopted_without_a_write():
    fake = kernel(A, B)
    plan = P.install(state(fake), (C,))
    assert (plan.action, plan.commands, plan.backends) == ("adopt", [], (A, B))  # `initial` not written


def test_an_unchanged_set_writes_nothing():
    fake = kernel(B, A)
    assert P.apply(state(fake), (A, B)) == P.apply(state(fake), steerable([B, A, B], PORT)[0])
    plan = P.apply(state(fake), (A, B))
    assert (plan.action, plan.commands) == ("nothing", [])
    # Another planner for the same table (a restarted daemon) agrees.
    assert Planner(TPL, T, PORT).apply(state(fake), (A, B)).commands == []


# --- set changes ---------------------------------------------------------------------


def test_a_set_change_flushes_and_refills_chains_only():
    fake = kernel(A, B)
    plan = P.apply(state(fake), (B, C))
    assert plan.action == "update"
    assert lines(plan.commands) == [
        *per_backend(C),
        f"flush chain ip {T} pick_0", *pick(0, [B, C]),
        f"flush chain ip {T} pick_1", *pick(1, [C, B]),
        f"flush chain ip {T} steer",
        f"add rule ip {T} steer numgen random mod 2 0 goto pick_0",
        f"add rule ip {T} steer goto pick_1",
        f"delete element ip {T} flag {{ {A.address} . 6443 }}",
        f"delete chain ip {T} flag_{backend_id(A)}",
        f"delete set ip {T} suspect_{backend_id(A)}",
        f"delete element ip {T} backends {{ {A.address} . 6443 }}",
        f"add element ip {T} backends {{ {C.address} . 6443 }}",
    ]
    fake.run(plan.commands)
    st = state(fake)
    assert st.slot_order == (B, C) and P.problems(st) == []


def test_no_map_in_the_steering_path():
    """The fix of the set-change race (docs/design/nft-set-change-race.md):
    no command puts a map lookup on the way of a connect, so a transaction
    never deactivates an element a packet of the previous generation looks
    up. The check itself finds the layout-2 rule that had the race."""
    plans = [P.create((LOCAL, A, B, C)), P.apply(state(kernel(A)), (A, B, C)).commands,
             P.apply(state(kernel(A, B, C)), (C,)).commands]
    assert [maps_in(cmds) for cmds in plans] == [[], [], []]
    assert all("replace" not in c for cmds in plans for c in cmds)
    layout2_rule = {"add": {"rule": {"family": "ip", "table": T, "chain": "nat_output", "expr": [
        {"vmap": {"key": {"numgen": {"mode": "random", "mod": 2, "offset": 0}},
                  "data": {"set": [[0, {"goto": {"target": "pick_0"}}], [1, {"goto": {"target": "pick_1"}}]]}}}]}}}
    assert maps_in([layout2_rule]) != []


SETS = [tuple(sorted(s)) for s in [(), (A,), (A, B), (B, C), (LOCAL,), (A, B, C), (A, C, LOCAL), (A, B, C, LOCAL)]]


@pytest.mark.parametrize("old", SETS, ids=lambda s: "from-" + "-".join(str(b.address).split(".")[2] for b in s))
def test_every_change_between_sets_applies_and_reads_back(old):
    for new in SETS:
        fake = kernel(*old)
        plan = P.apply(state(fake), new)
        fake.run(plan.commands)  # the fake refuses a wrong order (a chain deleted while referenced, ...)
        st = state(fake)
        assert (st.slot_order, st.listed, P.problems(st)) == (new, new, []), (old, new)
        assert st.flags == {b: f"flag_{backend_id(b)}" for b in new}
        assert set(st.chains) == set(TPL.chains) | {f"pick_{i}" for i in range(len(new))} | {
            f"flag_{i}" for i in ids(*new)}
        assert P.apply(st, new).commands == []  # and nothing more to write


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64])
def test_the_draw_gives_every_slot_one_nth(n):
    """Rule k of chain steer takes the connect with probability 1/(n-k) of
    what reaches it: every slot gets exactly 1/n."""
    rules = P.draw_rules(n)
    left, share = Fraction(1), []
    for k, rule in enumerate(rules):
        expr = rule["rule"]["expr"]
        assert expr[-1] == {"goto": {"target": f"pick_{k}"}}
        p = Fraction(1, expr[0]["match"]["left"]["numgen"]["mod"]) if len(expr) == 2 else Fraction(1)
        share.append(left * p)
        left -= left * p
    assert share == [Fraction(1, n)] * n and left == 0


def test_an_empty_set_leaves_no_steering():
    fake = kernel(A, B)
    plan = P.apply(state(fake), ())
    assert lines(plan.commands)[:3] == [f"flush chain ip {T} steer", f"delete chain ip {T} pick_0",
                                        f"delete chain ip {T} pick_1"]
    fake.run(plan.commands)
    st = state(fake)
    assert (st.slot_order, st.rules["steer"], P.problems(st)) == ((), [], [])


# --- older and damaged tables, cleanup ---------------------------------------------------


def older_layout(fake: FakeNft) -> None:
    """Turn a table into what layout 2 left: its marker, and the draw as a
    numgen vmap in nat_output instead of the chain `steer`."""
    t = fake.tables[T]
    t.rules["nat_postrouting"][0]["comment"] = "prism-kernel nftables layout=2 template=9532790453a5 listen=127.0.0.1:7445"
    n = len(t.rules["steer"])
    del t.rules["steer"], t.chains["steer"]
    t.rules["nat_output"][0]["expr"][-1] = {"vmap": {"key": {"numgen": {"mode": "random", "mod": n, "offset": 0}},
                                                     "data": {"set": [[i, {"goto": {"target": f"pick_{i}"}}]
                                                                      for i in range(n)]}}}


def test_an_older_layout_is_replaced_in_one_batch_keeping_its_backends():
    fake = kernel(A, B)
    older_layout(fake)
    st = state(fake)
    assert st.slot_order is None and st.backends == (A, B)  # read from the set `backends`
    plan = P.install(st, (C,))
    assert plan.action == "replace" and plan.backends == (A, B)
    assert any("marker" in p for p in plan.problems) and any("steering unreadable" in p for p in plan.problems)
    assert plan.commands[0] == {"delete": {"table": {"family": "ip", "name": T}}}
    assert plan.commands[1:] == P.create((A, B))
    fake.run(plan.commands)
    st = state(fake)
    assert st.slot_order == (A, B) and P.problems(st) == []


@pytest.mark.parametrize("damage, problem", [
    (lambda t: t.rules["filter_prerouting"].clear(), "chain filter_prerouting: 0 rules, want 2"),
    (lambda t: t.rules["steer"].pop(), "steering unreadable"),
    (lambda t: t.rules["pick_1"].pop(0), "steering unreadable"),
    (lambda t: t.chains.update(stray={"name": "stray"}) or t.rules.update(stray=[]), "unexpected chain stray"),
    (lambda t: t.sets.pop("outcomes"), "set outcomes missing"),
    (lambda t: t.rules[f"flag_{backend_id(A)}"].clear(), f"chain flag_{backend_id(A)} missing or wrong"),
    (lambda t: t.sets["flag"].elems.pop(), "map flag does not match"),
], ids=["flushed", "draw", "pick", "stray-chain", "set", "flag-chain", "flag-map"])
def test_a_damaged_table_is_recreated(damage, problem):
    fake = kernel(A, B)
    damage(fake.tables[T])
    st = state(fake)
    assert any(p.startswith(problem) for p in P.problems(st)), P.problems(st)
    plan = P.apply(st, (B, C))
    assert plan.action == "replace" and plan.commands == P.create((B, C), replace=True)
    fake.run(plan.commands)
    assert P.problems(state(fake)) == [] and state(fake).backends == (B, C)


def test_a_missing_table_is_created_and_cleanup_deletes_it():
    assert P.apply(None, (A,)).commands == P.create((A,))
    fake = kernel(A)
    fake.run(Planner.cleanup_commands(T))
    assert fake.list_table(T) is None
    with pytest.raises(Rejected):  # a second delete is refused: the data path checks the table first
        fake.run(Planner.cleanup_commands(T))


def test_a_carried_set_never_loops_back_to_the_listen_address():
    fake = kernel(A, Backend.of("127.0.0.1", 7446))
    older_layout(fake)
    moved = Planner(TPL, T, 7446)  # the listen port changed to a former backend's port
    assert moved.install(state(fake), (C,)).backends == (A,)


# --- what the kernel counted -------------------------------------------------------------


def test_counters_outcomes_and_flags_parse_from_the_kernels_listing():
    fake = kernel(A, B)
    t = fake.tables[T]
    # As `nft -j list table` shows elements the packet path added (forms seen on 6.18).
    t.sets["outcomes"].dynamic = [
        {"elem": {"val": {"concat": [str(A.address), 6443, "rst"]}, "counter": {"packets": 2, "bytes": 80}}},
        {"elem": {"val": {"concat": [str(A.address), 6443, "ack"]}, "counter": {"packets": 5, "bytes": 300}}},
        {"elem": {"val": {"concat": [str(B.address), 6443, "syn"]}, "counter": {"packets": 1, "bytes": 60}}},
        {"elem": {"val": {"concat": [str(B.address), 6443, {"|": ["syn", "ack"]}]}, "counter": {"packets": 9}}},
    ]
    t.sets[f"suspect_{backend_id(A)}"].dynamic = [{"elem": {"val": 7445, "timeout": 2, "expires": 1}}]
    t.sets["backends"].elems = [{"concat": [str(A.address), 6443]}, {"concat": [str(B.address), 6443]}]
    objs = fake.list_table(T)
    for o in objs:
        if o.get("set", {}).get("name") == "backends":
            o["set"]["elem"][0]["elem"]["counter"]["packets"] = 7
    st = parse_table(objs)
    assert st.outcomes == {A: Outcomes(refused=2, established=5), B: Outcomes(syn_timeouts=1)}
    assert st.suspect == {A: 1.0} and st.connections == {A: 7, B: 0}
    assert P.problems(st) == []  # dynamic elements are no damage


def test_a_one_element_map_listed_unwrapped():
    fake = kernel(A)
    objs = fake.list_table(T)
    for o in objs:
        if "map" in o:
            o["map"]["elem"] = o["map"]["elem"][0]  # [key, verdict], not [[key, verdict]]
    assert parse_table(objs).flags == {A: f"flag_{backend_id(A)}"}


# --- input --------------------------------------------------------------------------------


def test_steerable_keeps_ipv4_and_refuses_bad_backends():
    v6 = Backend.of("2001:2::1", 6443)
    assert steerable([B, A, v6, A], PORT) == ((A, B), (v6,))
    for bad in (Backend(4, A.address, 0), Backend.of("0.0.0.0", 80), Backend.of("224.0.0.1", 80),
                Backend.of("255.255.255.255", 80), Backend.of("127.0.0.1", PORT), Backend(6, A.address, 1),
                "198.18.1.2:6443"):
        with pytest.raises(DatapathError):
            steerable([A, bad], PORT)


def test_table_names():
    assert table_name("prism-kernel") == "prism_kernel"
    assert table_name("1st") == "pk_1st" and len(table_name("x" * 80)) == 64
