"""The eBPF data path's update plan: from the set the kernel publishes now and
the set wanted, the ordered list of map writes that moves the kernel from one
to the other (docs/design/ebpf-update-protocol.md).

Pure (no I/O, no kernel): EbpfDatapath executes the list through bpf(2), and
tests/test_update_protocol_model.py runs the same list against a model of the
maps with a reader interleaved at every word.

The maps the ops name (bpf/prism_sock.bpf.c, layout 5):
  pk_commit  ARRAY[1]  u64 seq: THE commit point. The buffer seq & 1 is live.
  pk_sets    ARRAY[2]  per buffer {gen, count4, count6}; gen = the seq under
                       which the buffer is live.
  pk_slots   ARRAY     slot_index(buf, family, i) -> {gen, backend, syn_rto};
                       syn_rto: the initial SYN RTO (jiffies) of a connect
                       steered to that backend, 0 = the kernel default.
Every element is preallocated and never freed: a write is a copy into the live
element, which a concurrent reader can see half done. A connect therefore
reads seq, copies what the buffer seq & 1 holds, accepts a slot only when its
gen equals seq, and reads seq again: a different seq means a write may have
overlapped the copy, and it starts over. The writer only ever writes the
buffer that is not live, then commits, so a reader that saw the same seq
twice copied a buffer nobody wrote meanwhile.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from prism_kernel.core.model import Backend
from prism_kernel.errors import DatapathError

MAX_BACKENDS = 64  # per family and buffer; PK_MAX_BACKENDS in the C source
SLOTS = 2 * 2 * MAX_BACKENDS  # two buffers of two families
OUTCOMES_TRIM_AT = 3 / 4  # pk_passive: drop entries of backends outside the set above this fill
MAX_SYN_RTO = 0xFFFF  # jiffies: pk_peer.syn_rto is 16 bits


@dataclass(frozen=True)
class Live:
    """What the kernel publishes now: the commit sequence number, the set
    of the buffer it makes live (both families, sorted) and the initial SYN
    RTO of its backends that have one (jiffies, sorted by backend)."""

    seq: int
    v4: tuple[Backend, ...] = ()
    v6: tuple[Backend, ...] = ()
    syn_rto: tuple[tuple[Backend, int], ...] = ()

    @property
    def buf(self) -> int:
        return self.seq & 1


# --- the operations, in the order the plan lists them -------------------------


@dataclass(frozen=True)
class CreateCounter:
    """pk_counters[backend] = 0 unless it exists: counted from its first connect."""

    backend: Backend


@dataclass(frozen=True)
class WriteSlot:
    """pk_slots[slot_index(buf, family, index)] = {gen, backend, syn_rto}."""

    buf: int
    family: int
    index: int
    gen: int
    backend: Backend
    syn_rto: int = 0  # jiffies; 0: the kernel default


@dataclass(frozen=True)
class WriteSet:
    """pk_sets[buf] = {gen, count4, count6}."""

    buf: int
    gen: int
    count4: int
    count6: int


@dataclass(frozen=True)
class Commit:
    """pk_commit = seq: from here connects pick from the buffer seq & 1."""

    seq: int


@dataclass(frozen=True)
class DeleteCounter:
    """pk_counters[backend] removed: the backend left the set."""

    backend: Backend


@dataclass(frozen=True)
class DeleteOutcomes:
    """pk_passive[backend] removed (only when the map fills up)."""

    backend: Backend


Op = CreateCounter | WriteSlot | WriteSet | Commit | DeleteCounter | DeleteOutcomes


def slot_index(buf: int, family: int, index: int) -> int:
    """PK_SLOT() in the C source: buffer-major, then family, then index."""
    if buf not in (0, 1) or family not in (4, 6) or not 0 <= index < MAX_BACKENDS:
        raise ValueError(f"no slot ({buf}, {family}, {index})")
    return buf * 2 * MAX_BACKENDS + (MAX_BACKENDS if family == 6 else 0) + index


def split_families(backends: Iterable[Backend]) -> tuple[tuple[Backend, ...], tuple[Backend, ...]]:
    """The set as the kernel holds it: unique, sorted, per family; refused
    (DatapathError) when a family has more than MAX_BACKENDS or a backend is
    malformed, before anything is written."""
    uniq = sorted(set(backends))
    for b in uniq:
        if b.family not in (4, 6) or b.address.version != b.family:
            raise DatapathError(f"backend {b}: family {b.family} does not match its address")
        if not 0 < b.port < 65536:
            raise DatapathError(f"backend {b}: port out of range")
    v4 = tuple(b for b in uniq if b.family == 4)
    v6 = tuple(b for b in uniq if b.family == 6)
    for fam, lst in ((4, v4), (6, v6)):
        if len(lst) > MAX_BACKENDS:
            raise DatapathError(f"{len(lst)} IPv{fam} backends: the eBPF data path holds "
                                f"at most {MAX_BACKENDS} per family")
    return v4, v6


def syn_rto_of(backends: Iterable[Backend], syn_rto: Mapping[Backend, int]) -> tuple[tuple[Backend, int], ...]:
    """The non-zero SYN RTOs (jiffies) of `backends`, as Live holds them;
    refused (DatapathError) when one does not fit pk_peer.syn_rto."""
    out = []
    for b in sorted(set(backends)):
        v = syn_rto.get(b, 0)
        if not 0 <= v <= MAX_SYN_RTO:
            raise DatapathError(f"backend {b}: initial SYN RTO {v} jiffies out of range")
        if v:
            out.append((b, v))
    return tuple(out)


def plan_update(live: Live, backends: Iterable[Backend], counters: Collection[Backend] = (),
                outcomes: Collection[Backend] = (), max_outcomes: int = 1024,
                syn_rto: Mapping[Backend, int] | None = None) -> tuple[Op, ...]:
    """The ops that make the kernel steer to exactly `backends`, with the
    initial SYN RTO `syn_rto` (jiffies; a backend not in it: the kernel
    default).

    `live` is what pk_commit / pk_sets / pk_slots publish now, `counters` the
    keys of pk_counters, `outcomes` those of pk_passive. When the set and its
    RTOs are unchanged there is no commit, only the repair of counter entries
    (a failure after an earlier commit left them behind); a change of RTO
    alone is a new generation like a change of the set. Order:
      1. counters of new backends (a connect may count from its first pick);
      2. slots of the new set into the buffer that is not live, tagged gen;
      3. that buffer's header {gen, counts};
      4. Commit(gen): the single point where connects move to the new set;
      5. counters of backends that left; outcome entries when pk_passive fills.
    Nothing before 4 is visible to a connect; nothing after it is needed for
    steering, so a failure there is repaired by the next plan."""
    v4, v6 = split_families(backends)
    wanted = set(v4) | set(v6)
    rto = syn_rto_of(wanted, syn_rto or {})
    ops: list[Op] = [CreateCounter(b) for b in sorted(wanted - set(counters))]
    if (v4, v6, rto) != (live.v4, live.v6, live.syn_rto):
        gen = live.seq + 1
        buf = gen & 1
        by_backend = dict(rto)
        for fam, lst in ((4, v4), (6, v6)):
            ops.extend(WriteSlot(buf, fam, i, gen, b, by_backend.get(b, 0)) for i, b in enumerate(lst))
        ops.append(WriteSet(buf, gen, len(v4), len(v6)))
        ops.append(Commit(gen))
    ops.extend(DeleteCounter(b) for b in sorted(set(counters) - wanted))
    if len(outcomes) > max_outcomes * OUTCOMES_TRIM_AT:
        ops.extend(DeleteOutcomes(b) for b in sorted(set(outcomes) - wanted))
    return tuple(ops)


def commit_index(ops: Sequence[Op]) -> int | None:
    """Position of the Commit in `ops` (None: the plan changes no set)."""
    for i, op in enumerate(ops):
        if isinstance(op, Commit):
            return i
    return None


def live_after(live: Live, ops: Sequence[Op]) -> Live:
    """What the kernel publishes once `ops` ran to the end."""
    i = commit_index(ops)
    if i is None:
        return live
    seq = ops[i].seq  # type: ignore[union-attr]
    slots = {(op.family, op.index): op for op in ops
             if isinstance(op, WriteSlot) and op.gen == seq}
    header = next(op for op in ops if isinstance(op, WriteSet) and op.gen == seq)
    live4 = [slots[(4, i)] for i in range(header.count4)]
    live6 = [slots[(6, i)] for i in range(header.count6)]
    return Live(seq, tuple(op.backend for op in live4), tuple(op.backend for op in live6),
                tuple(sorted((op.backend, op.syn_rto) for op in live4 + live6 if op.syn_rto)))
