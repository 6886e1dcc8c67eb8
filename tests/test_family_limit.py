"""The run-time limit on backends per family (prism_kernel.sources.family_limit):
DNS names and discovery can give more addresses than the data paths hold;
the first MAX_BACKENDS_PER_FAMILY of each family are kept (static endpoints
first), the rest dropped with one log line per change. Pure: no network, no
kernel."""

from __future__ import annotations

import ipaddress

from prism_kernel.core.model import Backend
from prism_kernel.sources.endpoints import MAX_BACKENDS_PER_FAMILY, EndpointSpec
from prism_kernel.sources.family_limit import FamilyLimit


class ListLog:
    def __init__(self):
        self.records: list[tuple[str, dict]] = []

    def info(self, event, **f):
        self.records.append((event, f))

    warn = error = info

    def events(self, name):
        return [f for e, f in self.records if e == name]


def v4(i: int) -> str:
    return str(ipaddress.IPv4Address("198.18.100.0") + i)


def v6(i: int) -> str:
    return str(ipaddress.IPv6Address("2001:2:0:100::") + i)


def spec_of(addr: str, port: int = 6443) -> tuple[EndpointSpec, list[Backend]]:
    return EndpointSpec(addr, port), [Backend.of(addr, port)]


def kept(out) -> list[Backend]:
    seen: dict[Backend, None] = {}
    for _spec, backends in out:
        for b in backends:
            seen[b] = None
    return list(seen)


def test_static_first_then_discovered_in_order_up_to_the_limit():
    log = ListLog()
    lim = FamilyLimit(log)
    static = [spec_of(v4(500)), spec_of(v4(501))]
    discovered = [spec_of(v4(i)) for i in range(100)]  # already sorted, as discovery reports them
    out = lim.apply(static + discovered)
    got = kept(out)
    assert len(got) == MAX_BACKENDS_PER_FAMILY == 64
    assert got[:2] == [Backend.of(v4(500), 6443), Backend.of(v4(501), 6443)]
    assert got[2:] == [Backend.of(v4(i), 6443) for i in range(62)]
    # every spec is still there (a dropped one with no backend), in order
    assert [s for s, _ in out] == [s for s, _ in static + discovered]
    (line,) = log.events("endpoints_truncated")
    assert (line["family"], line["limit"], line["kept"], line["dropped"]) == ("ipv4", 64, 64, 38)
    assert line["dropped_addresses"].startswith(f"{v4(62)}:6443,") and line["dropped_addresses"].endswith(",...")
    # the same input again: nothing new to say
    lim.apply(static + discovered)
    assert len(log.events("endpoints_truncated")) == 1
    # what is dropped changes: said once
    lim.apply(static + discovered[:70])
    assert [e["dropped"] for e in log.events("endpoints_truncated")] == [38, 8]
    # everything fits again: said once
    lim.apply(static + discovered[:10])
    assert [e["dropped"] for e in log.events("endpoints_truncated")] == [38, 8, 0]
    assert len(kept(lim.apply(static + discovered[:10]))) == 12


def test_a_name_with_more_addresses_than_the_limit_and_families_apart():
    """A DNS name giving 70 IPv6 and 70 IPv4 addresses: each family is cut
    at the limit on its own; a literal static address before the name keeps
    its place; an address given twice counts once."""
    log = ListLog()
    name = (EndpointSpec("cp.example.com", 6443),
            sorted([Backend.of(v6(i), 6443) for i in range(70)] + [Backend.of(v4(i), 6443) for i in range(70)]))
    first = spec_of(v6(1000))
    again = spec_of(v4(3))  # also one of the name's addresses
    out = lim_out = FamilyLimit(log).apply([first, name, again])
    got = kept(lim_out)
    assert sum(b.family == 4 for b in got) == 64 and sum(b.family == 6 for b in got) == 64
    assert got[0] == Backend.of(v6(1000), 6443)
    assert out[2][1] == [Backend.of(v4(3), 6443)]  # within the limit: kept for this spec too
    by_family = {e["family"]: e["dropped"] for e in log.events("endpoints_truncated")}
    assert by_family == {"ipv4": 6, "ipv6": 7}


def test_within_the_limit_nothing_is_dropped_or_logged():
    log = ListLog()
    specs = [spec_of(v4(i)) for i in range(64)] + [spec_of(v6(i)) for i in range(64)]
    out = FamilyLimit(log).apply(specs)
    assert out == specs and not log.records


def test_the_daemons_targets_hold_at_most_the_limit(monkeypatch):
    """Where the sets are merged (control.targets.Targets.sync): a name that
    resolves to 70 IPv4 addresses and 100 discovered IPv4 endpoints next to
    one static address give 64 IPv4 backends, the static one first, then
    the name's (a static endpoint) in address order; the discovered ones
    only as room is left."""
    import asyncio

    from prism_kernel.config import build_config
    from prism_kernel.control import targets as targets_mod
    from prism_kernel.control.targets import Targets

    name_addresses = sorted(Backend.of(v4(200 + i), 6443) for i in range(70))

    async def fake_resolve(spec):
        return name_addresses if spec.is_name else [Backend.of(spec.host, spec.port)]

    monkeypatch.setattr(targets_mod, "resolve", fake_resolve)
    config = build_config({"endpoints": [f"{v4(1000)}:6443", "cp.example.com:6443"], "probe": {"mode": "tcp"}}, {})
    log = ListLog()

    async def main():
        t = Targets(config, log, None)
        t.set_discovered([EndpointSpec(v4(i), 6443) for i in range(100)])
        # before the first resolution the static endpoints have no backends yet
        assert list(t.by_backend) == [Backend.of(v4(i), 6443) for i in range(64)]
        await t.resolve_all()
        return t

    t = asyncio.run(main())
    got = list(t.by_backend)
    assert len(got) == 64 and Backend.of(v4(1000), 6443) in got
    assert set(got) - {Backend.of(v4(1000), 6443)} == set(name_addresses[:63])
    assert all(t.by_backend[b].origins == ["cp.example.com:6443"] for b in name_addresses[:63])
    lines = log.events("endpoints_truncated")
    assert [(e["kept"], e["dropped"]) for e in lines] == [(64, 36), (64, 107)]
