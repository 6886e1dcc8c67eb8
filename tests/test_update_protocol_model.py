"""A model of the eBPF update protocol (docs/design/ebpf-update-protocol.md),
checked exhaustively: no root, no kernel.

The writer is the op list of the pure plan (prism_kernel.core.ebpf_plan),
expanded into single word stores: a map update is a copy the kernel makes
into an element, and a reader on another CPU can see it half done. The
reader is the connect program's pick, written out load by load as
bpf/prism_sock.bpf.c does it. The explorer runs the reader against every
writer position at every one of its loads (a reader may stall anywhere for as
long as it likes: an interrupt, a preempted vCPU), every random choice, both
directions of the suspect walk, and checks every result:

  * a picked backend is a member of the one set the reader committed to (the
    generation it read), of its own family: not a mix of two sets, not a
    slot of another generation, not a torn copy;
  * the initial SYN RTO copied with it is the one that generation gave that
    backend (a change of RTO alone is a generation of its own);
  * that generation was live at some point while the reader ran;
  * "no backend" is only answered for a set whose family is empty.

The protocol in use passes. Broken ones are encoded too and must be caught:
today's (layouts 1-4: HASH selector and slots, with an allocator that hands a
freed element out again at once, as bpf_mem_alloc does since Linux 6.1, and
with one that never does), the new protocol without the reader's second read
of the commit word, and a writer that writes into the live buffer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prism_kernel.core import ebpf_plan as plan
from prism_kernel.core.model import Backend

MAX = plan.MAX_BACKENDS
PICK_TRIES = 4  # PK_PICK_TRIES in the C source
LEGACY_PICK_TRIES = 3  # layouts 1-4
SLOT_WORDS = 8  # struct pk_slot: gen (2 words), backend (5), syn_rto
SLOT_COPY_WORDS = 6  # what a pick copies of a slot: backend (5), syn_rto
SET_WORDS = 4  # struct pk_set: gen (2 words), count4, count6
MASK32 = 0xFFFFFFFF

V4 = [Backend.of(f"10.0.0.{i}", 6443) for i in range(1, 5)]
V6 = [Backend.of(f"fd00::{i}", 6443) for i in range(1, 4)]
POOL = V4 + V6


def backend_words(b: Backend) -> tuple[int, ...]:
    """The five 4-byte words of a backend in a map value. Every word differs
    between any two backends, so a copy torn between two of them is no backend."""
    k = POOL.index(b) + 1
    return tuple(k * 1000 + w for w in range(5))


WORDS_TO_BACKEND = {backend_words(b): b for b in POOL}


def rto_for(step: int, sets: Sequence[Sequence[Backend]]) -> dict[Backend, int]:
    """The SYN RTOs (jiffies) the writer gives the set of `step`: different
    in every step (a value of another generation is wrong), none for some
    backends (the kernel default, 0)."""
    return {b: 50 + 10 * step + POOL.index(b) for b in sets[step] if (step + POOL.index(b)) % 3}


def u64_words(v: int) -> list[int]:
    return [v & MASK32, v >> 32]


# --- results and the checker ---------------------------------------------------


@dataclass(frozen=True)
class Picked:
    words: tuple[int, ...]
    gen: int  # the generation the reader committed to
    tries: int = 1


@dataclass(frozen=True)
class Empty:
    gen: int | None
    tries: int = 1


@dataclass(frozen=True)
class Exhausted:
    tries: int = PICK_TRIES


@dataclass
class Report:
    violations: list[str] = field(default_factory=list)
    results: int = 0
    picked: int = 0
    retried: int = 0  # results reached after at least one retry
    exhausted: int = 0
    states: int = 0


def check(result: Any, family: int, history: dict[int, plan.Live], window: tuple[int, int],
          report: Report) -> None:
    """`window`: the generations live at some point while the reader ran."""
    report.results += 1
    report.retried += result.tries > 1
    lo, hi = window
    if isinstance(result, Exhausted):
        report.exhausted += 1
        return
    if result.gen not in history:
        report.violations.append(f"{result}: generation {result.gen} was never committed")
        return
    live = history[result.gen]
    members = live.v4 if family == 4 else live.v6
    if not lo <= result.gen <= hi:
        report.violations.append(f"{result}: generation {result.gen} was not live while the "
                                 f"reader ran (live: {lo}..{hi})")
    if isinstance(result, Empty):
        if members:
            report.violations.append(f"no backend answered, but generation {result.gen} has "
                                     f"IPv{family} backends {members}")
        return
    report.picked += 1
    b = WORDS_TO_BACKEND.get(result.words[:5])
    if b is None:
        report.violations.append(f"torn backend {result.words} (a mix of backends), "
                                 f"committed to generation {result.gen}")
    elif b not in members:
        report.violations.append(f"backend {b} is not in generation {result.gen} "
                                 f"({list(members)}): a slot of another generation")
    elif len(result.words) > 5 and result.words[5] != dict(live.syn_rto).get(b, 0):
        report.violations.append(f"backend {b} with SYN RTO {result.words[5]}, generation "
                                 f"{result.gen} gave it {dict(live.syn_rto).get(b, 0)}: an RTO of "
                                 f"another generation")


# --- memory: the maps as words --------------------------------------------------


@dataclass(frozen=True)
class Load:
    """An aligned load of `n` words (n=2: one 8-byte load, single-copy atomic)."""

    region: str
    index: int
    n: int = 1


@dataclass(frozen=True)
class Lookup:
    """A hash map lookup: the element the key maps to now (its id), or None."""

    map: str
    key: Any


@dataclass(frozen=True)
class LoadElem:
    """Words of a hash element through a pointer a lookup returned earlier:
    whatever the element holds now, also after it was freed and reused."""

    elem: int
    words: tuple[int, ...]


@dataclass(frozen=True)
class Choose:
    """A nondeterministic choice in range(n) (bpf_get_prandom_u32, a suspect mark)."""

    n: int


class Memory:
    """Array maps as flat word lists; hash maps as buckets (key -> element id)
    over a heap of elements whose words can be rewritten in place."""

    def __init__(self) -> None:
        self.arrays: dict[str, list[int]] = {}
        self.buckets: dict[str, dict[Any, int]] = {}
        self.heap: list[list[int]] = []

    def copy(self) -> Memory:
        m = Memory()
        m.arrays = {k: list(v) for k, v in self.arrays.items()}
        m.buckets = {k: dict(v) for k, v in self.buckets.items()}
        m.heap = [list(e) for e in self.heap]
        return m

    def answer(self, req: Any) -> Any:
        if isinstance(req, Load):
            w = self.arrays[req.region][req.index:req.index + req.n]
            return w[0] if req.n == 1 else w[0] | (w[1] << 32)
        if isinstance(req, Lookup):
            return self.buckets[req.map].get(req.key)
        if isinstance(req, LoadElem):
            if req.elem >= len(self.heap):
                return None  # not allocated yet: before the lookup that found it
            return tuple(self.heap[req.elem][w] for w in req.words)
        raise TypeError(req)


# --- the writer: plan ops as single word stores ------------------------------------


class Writer:
    """Records the memory after every single store: snapshots[p] is what a
    reader sees between store p-1 and store p. `committed[p]` is the
    generation published at p, `committing[p]` the one whose commit store is
    under way (the same when none is)."""

    def __init__(self, mem: Memory, gen: int, order: str):
        self.mem = mem
        self.order = order
        self.snapshots = [mem.copy()]
        self.committed = [gen]
        self.committing = [gen]
        self._gen = gen
        self._next_gen = gen

    def _step(self, change: Callable[[Memory], None]) -> None:
        change(self.mem)
        self.snapshots.append(self.mem.copy())
        self.committed.append(self._gen)
        self.committing.append(self._next_gen)

    def _ordered(self, n: int) -> list[int]:
        return list(range(n)) if self.order == "forward" else list(range(n))[::-1]

    def store(self, region: str, base: int, words: Sequence[int]) -> None:
        """A map update of an array element: a copy into the live value."""
        for i in self._ordered(len(words)):
            self._step(lambda m, i=i: m.arrays[region].__setitem__(base + i, words[i]))

    def commit(self, region: str, base: int, gen: int) -> None:
        self._next_gen = gen
        self.store(region, base, u64_words(gen))
        self._gen = gen
        self.committed[-1] = gen

    def hash_update(self, name: str, key: Any, words: Sequence[int], alloc: Allocator) -> None:
        """htab_map_update_elem, not preallocated: a new element is allocated
        and filled (a reused one in place), linked, and the old one freed."""
        elem = alloc.alloc(self.mem, name, len(words))
        for i in self._ordered(len(words)):
            self._step(lambda m, i=i: m.heap[elem].__setitem__(i, words[i]))
        old = self.mem.buckets[name].get(key)
        self._step(lambda m: m.buckets[name].__setitem__(key, elem))
        if old is not None:
            alloc.free(name, old)

    def hash_delete(self, name: str, key: Any, alloc: Allocator) -> None:
        old = self.mem.buckets[name].get(key)
        if old is not None:
            self._step(lambda m: m.buckets[name].pop(key))
            alloc.free(name, old)

    def commit_hash(self, name: str, key: Any, words: Sequence[int], gen: int, alloc: Allocator) -> None:
        self._next_gen = gen
        self.hash_update(name, key, words, alloc)
        self._gen = gen
        self.committed[-1] = gen


class Allocator:
    """`reuse`: a freed element is the next one handed out (bpf_mem_alloc's
    per-CPU free list, Linux >= 6.1, and preallocated maps: no grace period).
    `rcu`: a freed element is never handed out while the model runs (what the
    layout 1-4 protocol assumed of BPF_F_NO_PREALLOC)."""

    def __init__(self, policy: str):
        self.policy = policy
        self.free_lists: dict[str, list[int]] = {}  # one bpf_mem_alloc per map

    def alloc(self, mem: Memory, name: str, n: int) -> int:
        free = self.free_lists.setdefault(name, [])
        if self.policy == "reuse" and free:
            return free.pop()
        mem.heap.append([0] * n)
        return len(mem.heap) - 1

    def free(self, name: str, elem: int) -> None:
        self.free_lists.setdefault(name, []).append(elem)


# --- the protocol in use (layout 5) ------------------------------------------------


def new_memory(live: plan.Live) -> Memory:
    """Maps that publish `live` (the other buffer empty, generation 0)."""
    m = Memory()
    m.arrays["commit"] = u64_words(live.seq)
    m.arrays["sets"] = [0] * (2 * SET_WORDS)
    m.arrays["slots"] = [0] * (plan.SLOTS * SLOT_WORDS)
    b = live.buf
    m.arrays["sets"][b * SET_WORDS:(b + 1) * SET_WORDS] = [*u64_words(live.seq), len(live.v4), len(live.v6)]
    rto = dict(live.syn_rto)
    for fam, lst in ((4, live.v4), (6, live.v6)):
        for i, be in enumerate(lst):
            base = plan.slot_index(b, fam, i) * SLOT_WORDS
            m.arrays["slots"][base:base + SLOT_WORDS] = [*u64_words(live.seq), *backend_words(be),
                                                         rto.get(be, 0)]
    return m


def run_new_writer(w: Writer, ops: Sequence[plan.Op], live_buffer_bug: bool = False) -> None:
    for op in ops:
        if isinstance(op, plan.WriteSlot):
            buf = op.buf ^ 1 if live_buffer_bug else op.buf
            w.store("slots", plan.slot_index(buf, op.family, op.index) * SLOT_WORDS,
                    [*u64_words(op.gen), *backend_words(op.backend), op.syn_rto])
        elif isinstance(op, plan.WriteSet):
            buf = op.buf ^ 1 if live_buffer_bug else op.buf
            w.store("sets", buf * SET_WORDS, [*u64_words(op.gen), op.count4, op.count6])
        elif isinstance(op, plan.Commit):
            w.commit("commit", 0, op.seq)
        # counters and outcome entries: never read by the pick


Reader = Generator[Any, Any, Any]


def new_reader(family: int, recheck: bool = True,
               copy_order: Sequence[int] = range(SLOT_COPY_WORDS)) -> Reader:
    """pk_pick() of bpf/prism_sock.bpf.c, load by load. Each request comes
    with the reader's live variables (what its future depends on), so that
    the explorer merges readers that got there by different loads."""
    for tries in range(1, PICK_TRIES + 1):
        seq = yield ("seq", tries), Load("commit", 0, 2)
        buf = seq & 1
        if (yield ("set.gen", tries, seq), Load("sets", buf * SET_WORDS, 2)) != seq:
            continue  # the buffer was not (or no longer) committed as seq
        count = yield ("count", tries, seq), Load("sets", buf * SET_WORDS + (2 if family == 4 else 3))
        if count == 0 or count > MAX:
            if (yield ("empty", tries, seq), Load("commit", 0, 2)) == seq:
                return Empty(seq, tries)
            continue
        idx = yield ("idx", tries, seq, count), Choose(count)
        be = yield from _copy_slot(buf, family, idx, seq, (tries, count, idx), copy_order)
        if be is None:
            continue
        if count > 1 and (yield ("suspect?", tries, seq, count, idx, be), Choose(2)):
            # the pick is suspect: walk the others from idx, one way or the other
            step = 1 if (yield ("dir", tries, seq, count, idx, be), Choose(2)) else count - 1
            raced = False
            for i in range(1, count):
                idx = (idx + step) % count
                cand = yield from _copy_slot(buf, family, idx, seq, (tries, count, idx, be, step, i),
                                             copy_order)
                if cand is None:
                    raced = True
                    break
                if not (yield ("cand suspect?", tries, seq, count, idx, be, step, i, cand), Choose(2)):
                    be = cand
                    break
            if raced:
                continue
        if recheck and (yield ("recheck", tries, seq, be), Load("commit", 0, 2)) != seq:
            continue  # a commit since: the copy may have overlapped a write
        return Picked(be, seq, tries)
    return Exhausted()


def _copy_slot(buf: int, family: int, idx: int, seq: int, ctx: tuple, order: Sequence[int]):
    base = plan.slot_index(buf, family, idx) * SLOT_WORDS
    if (yield ("slot.gen", seq, ctx), Load("slots", base, 2)) != seq:
        return None  # written under another commit
    words: dict[int, int] = {}
    for w in order:
        words[w] = yield ("slot.word", seq, ctx, tuple(sorted(words.items()))), Load("slots", base + 2 + w)
    return tuple(words[w] for w in range(SLOT_COPY_WORDS))


# --- the protocol of layouts 1-4 -------------------------------------------------------
# pk_active HASH[1] {gen, count4, count6, buf}; pk_slots HASH (family, buf, idx) -> backend.


def legacy_memory(live: plan.Live, alloc: Allocator) -> Memory:
    m = Memory()
    m.buckets = {"active": {}, "slots": {}}
    w = Writer(m, live.seq, "forward")
    for fam, lst in ((4, live.v4), (6, live.v6)):
        for i, be in enumerate(lst):
            w.hash_update("slots", (fam, live.buf, i), backend_words(be), alloc)
    w.hash_update("active", 0, [*u64_words(live.seq), len(live.v4), len(live.v6), live.buf, 0], alloc)
    return m


def legacy_writer(w: Writer, live: plan.Live, new: plan.Live, alloc: Allocator) -> None:
    """_write_set() of layouts 1-4: slots into the inactive buffer, the
    selector replaced (the commit), then stale slots deleted."""
    nb = new.buf
    for fam, lst in ((4, new.v4), (6, new.v6)):
        for i, be in enumerate(lst):
            w.hash_update("slots", (fam, nb, i), backend_words(be), alloc)
    w.commit_hash("active", 0, [*u64_words(new.seq), len(new.v4), len(new.v6), nb, 0], new.seq, alloc)
    counts = {4: len(new.v4), 6: len(new.v6)}
    for key in sorted(w.mem.buckets["slots"]):
        fam, b, idx = key
        if b != nb or idx >= counts[fam]:
            w.hash_delete("slots", key, alloc)


def legacy_reader(family: int) -> Reader:
    """pk_pick_once() of layouts 1-4. The generation the reader committed to
    is read with the count, from the same element (a ghost read: the program
    itself never reads gen)."""
    for tries in range(1, LEGACY_PICK_TRIES + 1):
        act = yield ("act", tries), Lookup("active", 0)
        if act is None:
            return Empty(None, tries)
        count, lo, hi = yield ("count", tries, act), LoadElem(act, (2 if family == 4 else 3, 0, 1))
        gen = lo | (hi << 32)
        (buf,) = yield ("buf", tries, act, count, gen), LoadElem(act, (4,))
        if count == 0 or count > MAX:
            return Empty(gen, tries)
        idx = yield ("idx", tries, count, gen, buf), Choose(count)
        el = yield ("slot", tries, count, gen, buf, idx), Lookup("slots", (family, buf & 1, idx))
        if el is None:
            continue  # slot removed under the reader: re-read the selector
        words: tuple[int, ...] = ()
        for w in range(5):
            (word,) = yield ("word", tries, gen, el, words), LoadElem(el, (w,))
            words += (word,)
        return Picked(words, gen, tries)
    return Exhausted(LEGACY_PICK_TRIES)


# --- the explorer ----------------------------------------------------------------------


def explore(writer: Writer, history: dict[int, plan.Live], family: int,
            make_reader: Callable[[], Reader]) -> Report:
    """Every interleaving of one reader with the writer's stores.

    A state is (writer position, the reader's live variables, the
    generation published when it started); the answers it got so far are
    kept to replay it (a generator cannot be copied). A load may happen at any position
    from the current one on; positions where its answer does not change are
    equivalent, and of those the earliest leaves every later choice open, so
    a load branches once per distinct answer still to come (its value runs).
    The reader's first load also branches where the published generation
    changes: the liveness check starts there."""
    report = Report()
    runs_cache: dict[tuple[Any, bool], list[tuple[int, Any]]] = {}

    def runs(req: Any, first: bool) -> list[tuple[int, Any]]:
        key = (req, first)
        if key not in runs_cache:
            out: list[tuple[int, Any]] = []
            for p, snap in enumerate(writer.snapshots):
                a = snap.answer(req)
                mark = (a, writer.committed[p]) if first else a
                if not out or out[-1][1] != mark:
                    out.append((p, mark))
            runs_cache[key] = out
        return runs_cache[key]

    stack: list[tuple[int, tuple, int | None]] = [(0, (), None)]
    seen: set[tuple[int, Any, int | None]] = set()
    last = len(writer.snapshots) - 1
    while stack:
        pos, answers, oldest = stack.pop()
        reader = make_reader()
        result: Any = None
        try:
            live, req = next(reader)
            for a in answers:
                live, req = reader.send(a)
        except StopIteration as stop:
            result = stop.value
        key = (pos, result if result is not None else live, oldest)
        if key in seen:
            continue
        seen.add(key)
        if result is not None:
            check(result, family, history, (oldest, writer.committing[last]), report)
            continue
        if isinstance(req, Choose):
            stack.extend((pos, answers + (c,), oldest) for c in range(req.n))
            continue
        rs = runs(req, oldest is None)
        for i, (start, mark) in enumerate(rs):
            end = rs[i + 1][0] - 1 if i + 1 < len(rs) else last
            if end < pos:
                continue
            at = max(pos, start)
            if oldest is None:
                answer, published = mark
                stack.append((at, answers + (answer,), published))
            else:
                stack.append((at, answers + (mark,), oldest))
    report.states = len(seen)
    return report


@dataclass
class Scenario:
    sets: list[list[Backend]]
    seq0: int = 0
    order: str = "forward"


def new_protocol(sc: Scenario, family: int, recheck: bool = True, live_buffer_bug: bool = False,
                 copy_order: Sequence[int] = range(SLOT_COPY_WORDS)) -> Report:
    live = plan.Live(sc.seq0, *plan.split_families(sc.sets[0]),
                     plan.syn_rto_of(sc.sets[0], rto_for(0, sc.sets)))
    w = Writer(new_memory(live), sc.seq0, sc.order)
    history = {live.seq: live}
    counters: set[Backend] = set(sc.sets[0])
    for step, s in enumerate(sc.sets[1:], start=1):
        ops = plan.plan_update(live, s, counters, syn_rto=rto_for(step, sc.sets))
        run_new_writer(w, ops, live_buffer_bug)
        live = plan.live_after(live, ops)
        history[live.seq] = live
        counters = set(s)
    return explore(w, history, family, lambda: new_reader(family, recheck, copy_order))


def legacy_protocol(sc: Scenario, family: int, policy: str) -> Report:
    alloc = Allocator(policy)
    live = plan.Live(sc.seq0, *plan.split_families(sc.sets[0]))
    w = Writer(legacy_memory(live, alloc), sc.seq0, sc.order)
    history = {live.seq: live}
    for s in sc.sets[1:]:
        v4, v6 = plan.split_families(s)
        if (v4, v6) == (live.v4, live.v6):
            continue
        new = plan.Live(live.seq + 1, v4, v6)
        legacy_writer(w, live, new, alloc)
        live = new
        history[live.seq] = live
    return explore(w, history, family, lambda: legacy_reader(family))


# --- tests ---------------------------------------------------------------------------------

# Sets that change every member each time (a stale slot is always wrong),
# grow and shrink (counts from one set with slots of another), and empty a
# family (the empty answer must be true); the last step changes only the
# SYN RTOs (rto_for() differs in every step).
CHURN = Scenario([[V4[0], V6[0]], [V4[1], V4[2], V6[1]], [V4[3]], [V4[0], V4[1], V6[2]],
                  [V4[2], V6[0], V6[1]], [V4[2], V6[0], V6[1]]])
# The same set throughout, only its RTOs change.
RTO_ONLY = Scenario([[V4[0], V4[1], V6[0]]] * 4)


# The order the program copies a slot's words in (the backend's, then its
# syn_rto; bpf/prism_sock.bpf.o today: 4, 3, 2, 0, 1, then 5) is clang's
# choice; the protocol must not depend on it.
COPY_ORDERS = {"copy-forward": (0, 1, 2, 3, 4, 5), "copy-backward": (5, 4, 3, 2, 1, 0)}


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("order", ["forward", "backward"])
@pytest.mark.parametrize("copy", sorted(COPY_ORDERS))
@pytest.mark.parametrize("seq0", [0, MASK32 - 1], ids=["seq-0", "seq-carry"])
def test_protocol_in_use_holds(family, order, copy, seq0):
    """Every interleaving, every word of every copy (the writer's stores in
    either order, the reader's loads in either order), the 32-bit carry of
    the commit word (a torn 8-byte store reads as a generation never
    committed): every answer is right, and the re-read path is taken."""
    rep = new_protocol(Scenario(CHURN.sets, seq0, order), family, copy_order=COPY_ORDERS[copy])
    assert rep.violations == [], rep.violations[:5]
    assert rep.picked > 0 and rep.retried > 0 and rep.exhausted > 0
    print(f"IPv{family} {order} {copy} seq0={seq0}: {rep.states} states, {rep.results} results, "
          f"{rep.retried} after a retry, {rep.exhausted} exhausted")


@pytest.mark.parametrize("family", [4, 6])
def test_a_change_of_rto_alone_holds(family):
    """Every step commits a generation that differs from the last only in
    its RTOs: each pick carries the RTO of the generation it committed to."""
    ops = plan.plan_update(plan.Live(0, *plan.split_families(RTO_ONLY.sets[0])), RTO_ONLY.sets[1],
                           set(RTO_ONLY.sets[0]), syn_rto=rto_for(1, RTO_ONLY.sets))
    assert plan.commit_index(ops) is not None
    rep = new_protocol(RTO_ONLY, family)
    assert rep.violations == [], rep.violations[:5]
    assert rep.picked > 0 and rep.retried > 0


def test_an_rto_of_another_generation_is_caught():
    """The checker sees the RTO: with the writer writing the live buffer, a
    change of RTO alone is picked up under the old generation."""
    rep = new_protocol(RTO_ONLY, 4, live_buffer_bug=True)
    assert any("an RTO of another generation" in v for v in rep.violations), rep.violations[:5]


def test_exhaustion_needs_a_commit_during_every_attempt():
    """A pick gives up (and the connect is left alone, counted) only when the
    writer committed during each of its PICK_TRIES attempts: with fewer
    commits than attempts in the whole run, no reader is ever exhausted."""
    sets = CHURN.sets[:PICK_TRIES]  # PICK_TRIES - 1 commits
    rep = new_protocol(Scenario(sets), 4)
    assert rep.violations == [] and rep.exhausted == 0 and rep.retried > 0


BROKEN = {
    # layouts 1-4, with the allocator of Linux >= 6.1 (a freed element is
    # handed out again at once) and with one that never reuses an element
    "layout-4, bpf_mem_alloc reuse": lambda sc, fam: legacy_protocol(sc, fam, "reuse"),
    "layout-4, no reuse": lambda sc, fam: legacy_protocol(sc, fam, "rcu"),
    # layout 5 without the second read of the commit word
    "no re-read of the commit word": lambda sc, fam: new_protocol(sc, fam, recheck=False),
    # a writer that writes the live buffer instead of the other one
    "writer writes the live buffer": lambda sc, fam: new_protocol(sc, fam, live_buffer_bug=True),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_protocols_are_caught(name):
    rep = BROKEN[name](CHURN, 4)
    assert rep.violations, f"{name}: no violation found in {rep.states} states"
    print(f"{name}: {len(rep.violations)} violations in {rep.states} states, e.g. {rep.violations[0]}")


def test_layout4_reuse_tears_a_backend():
    """With immediate reuse, layout 4's reader copies a slot element that the
    next update is filling for another backend: a torn address."""
    rep = legacy_protocol(CHURN, 4, "reuse")
    assert any(v.startswith("torn backend") for v in rep.violations), rep.violations[:5]


def test_layout4_without_reuse_picks_a_slot_of_another_generation():
    """Grace periods alone did not make layout 4 right: a reader that read
    the selector, stalled across two updates and then looked its slot up
    found the key written again for a later set."""
    rep = legacy_protocol(CHURN, 4, "rcu")
    assert any("another generation" in v or "was not live" in v for v in rep.violations), rep.violations[:5]


def _small(s: list[Backend]) -> list[Backend]:
    """At most two backends per family: the walk and the torn counts are all
    there, the state space stays small."""
    v4 = sorted({b for b in s if b.family == 4})[:2]
    v6 = sorted({b for b in s if b.family == 6})[:2]
    return v4 + v6


backend_sets = st.lists(st.sampled_from(POOL), max_size=4).map(_small)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sets=st.lists(backend_sets, min_size=2, max_size=5),
       family=st.sampled_from([4, 6]), order=st.sampled_from(["forward", "backward"]),
       copy=st.sampled_from(sorted(COPY_ORDERS)), seq0=st.sampled_from([0, 1, MASK32 - 1, MASK32]))
def test_protocol_in_use_holds_for_any_sets(sets, family, order, copy, seq0):
    rep = new_protocol(Scenario(sets, seq0, order), family, copy_order=COPY_ORDERS[copy])
    assert rep.violations == [], rep.violations[:5]


def test_model_reader_is_the_programs_pick():
    """The model's constants are the program's (a change there must be made here too)."""
    text = (Path(plan.__file__).resolve().parents[2] / "bpf" / "prism_sock.bpf.c").read_text()
    assert re.search(r"^#define PK_PICK_TRIES (\d+)\b", text, re.MULTILINE).group(1) == str(PICK_TRIES)
    assert re.search(r"^#define PK_MAX_BACKENDS (\d+)\b", text, re.MULTILINE).group(1) == str(MAX)
