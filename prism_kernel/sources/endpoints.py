"""Endpoint sources: parse `HOST:PORT` specs and resolve them to backends.

A spec is `IPv4:PORT`, `[IPv6]:PORT` or `NAME:PORT`, or the URL
`https://HOST:PORT` as kubeconfigs and Talos configs write the cluster
endpoint. A DNS name is resolved by the daemon and re-resolved periodically;
every address it yields is a backend of its own, probed separately.

Specs are normalised so that one endpoint has one spelling: IPv6 addresses in
their compressed form (RFC 5952), DNS names in lower case without a trailing
dot. The configuration rejects two entries that normalise to the same spec
(docs/configuration.md, "Endpoints").
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from dataclasses import dataclass

from prism_kernel.core.model import Backend

# RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens.
_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_HOSTNAME_RE = re.compile(rf"^{_LABEL}(\.{_LABEL})*\.?$")
_MAX_NAME = 253  # RFC 1035: a name in text form, without the trailing dot
_PORT_RE = re.compile(r"[0-9]{1,5}")  # ASCII digits only: str.isdigit() also takes '²' and '١'
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")

# Backends per address family that both data paths hold: the eBPF maps have
# PK_MAX_BACKENDS (bpf/prism_sock.bpf.c, datapath.ebpf.datapath.MAX_BACKENDS)
# slots per family; nftables has no fixed size but builds N chains of N + 1
# rules (nft/README.md), and 64 is what the eBPF path can take.
MAX_BACKENDS_PER_FAMILY = 64
# Every entry gives at least one address, so more entries than both families
# together can hold can never all be steered.
MAX_ENDPOINT_ENTRIES = 2 * MAX_BACKENDS_PER_FAMILY


@dataclass(frozen=True)
class EndpointSpec:
    """One configured endpoint, normalised (see parse_endpoint)."""

    host: str  # an IP address (without brackets) or a DNS name
    port: int

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    @property
    def is_name(self) -> bool:
        return self.ip is None

    @property
    def family(self) -> int | None:
        """4 or 6 for an address; None for a name (its addresses are known at run time)."""
        ip = self.ip
        return None if ip is None else ip.version

    def __str__(self) -> str:
        ip = self.ip
        if ip is not None and ip.version == 6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_endpoint(text: str) -> EndpointSpec:
    """Parse and normalise one endpoint spec; ValueError says what is wrong
    and what to write instead."""
    raw = text
    text = text.strip()
    scheme = _SCHEME_RE.match(text)
    if scheme:
        text = _url_authority(raw, scheme.group(1), text[scheme.end():])
    if not text:
        raise ValueError("empty endpoint")
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1:].startswith(":"):
            raise ValueError(f"{raw!r}: expected [IPv6]:PORT")
        host, port_text = text[1:end], text[end + 2:]
        if "%" in host:
            raise ValueError(f"{raw!r}: a zone index (%...) is not supported: use a global or "
                             "unique local IPv6 address")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if ip is None or ip.version != 6:
            raise ValueError(f"{raw!r}: {host!r} in brackets is not an IPv6 address")
        host = _usable_ipv6(raw, ip)
    else:
        if text.count(":") > 1:
            raise ValueError(f"{raw!r}: an IPv6 address must be written in brackets, as [ADDR]:PORT")
        if ":" not in text:
            raise ValueError(f"{raw!r}: no port (expected HOST:PORT, e.g. 10.0.0.1:6443)")
        host, port_text = text.rsplit(":", 1)
        if not host:
            raise ValueError(f"{raw!r}: no host before the port")
        if re.fullmatch(r"[0-9.]+", host):
            try:
                ip4 = ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(f"{raw!r}: {host!r} is not a valid IPv4 address") from None
            host = _usable_ipv4(raw, ip4)
        elif not _HOSTNAME_RE.match(host) or len(host.rstrip(".")) > _MAX_NAME:
            raise ValueError(f"{raw!r}: {host!r} is neither an IP address nor a valid DNS name")
        else:
            # DNS names are case-insensitive (RFC 4343) and "name." is "name".
            host = host.rstrip(".").lower()
    if not _PORT_RE.fullmatch(port_text):
        raise ValueError(f"{raw!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{raw!r}: port {port} is out of range 1-65535")
    return EndpointSpec(host, port)


def parse_endpoint_list(items: object) -> list[EndpointSpec]:
    """The configured list: every entry parsed, none twice, within the
    limits; ValueError names the first problem."""
    if not isinstance(items, list):
        raise ValueError("must be a list of HOST:PORT strings")
    if not items:
        raise ValueError("no endpoints: give at least one HOST:PORT (--endpoint)")
    if len(items) > MAX_ENDPOINT_ENTRIES:
        raise ValueError(f"{len(items)} endpoints: at most {MAX_ENDPOINT_ENTRIES} entries "
                         f"({MAX_BACKENDS_PER_FAMILY} addresses per family, the limit of the data paths)")
    spellings: dict[EndpointSpec, list[str]] = {}
    for item in items:
        if isinstance(item, EndpointSpec):
            spellings.setdefault(item, []).append(str(item))
        elif isinstance(item, str):
            spellings.setdefault(parse_endpoint(item), []).append(item.strip())
        else:
            text = repr(item) if not isinstance(item, int) or item.bit_length() <= 64 else "an integer"
            raise ValueError(f"{text[:60]} is not a HOST:PORT string")
    # Rejected, not merged: two entries for one endpoint are a copy or a typo
    # for another address, and the operator should see which.
    dups = [f"{spec} (written {' and '.join(map(repr, dict.fromkeys(texts)))})" if len(set(texts)) > 1
            else str(spec)
            for spec, texts in spellings.items() if len(texts) > 1]
    if dups:
        raise ValueError(f"duplicate endpoints: {', '.join(dups)}")
    out = list(spellings)
    for family in (4, 6):
        n = sum(1 for e in out if e.family == family)
        if n > MAX_BACKENDS_PER_FAMILY:
            raise ValueError(f"{n} IPv{family} addresses: at most {MAX_BACKENDS_PER_FAMILY} per family "
                             "(the eBPF data path's map size, PK_MAX_BACKENDS)")
    return out


def _url_authority(raw: str, scheme: str, rest: str) -> str:
    """HOST:PORT of an `https://HOST:PORT` URL; anything else a URL can hold
    is refused with what to write instead (docs/configuration.md)."""
    if scheme.lower() != "https":
        raise ValueError(f"{raw!r}: only https://HOST:PORT URLs are accepted; the probes speak TLS to "
                         "an API server: write HOST:PORT or https://HOST:PORT")
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    if tail not in ("", "/"):
        raise ValueError(f"{raw!r}: a URL with a path, query or fragment ({tail!r}): "
                         "the endpoint is an address, write https://HOST:PORT")
    if "@" in authority:
        raise ValueError(f"{raw!r}: user information (user@) is not accepted in an endpoint: "
                         "write https://HOST:PORT (client credentials: probe.client_cert_file)")
    if not authority:
        raise ValueError(f"{raw!r}: no host: write https://HOST:PORT")
    after_host = authority.rsplit("]", 1)[-1] if authority.startswith("[") else authority
    if ":" not in after_host:
        raise ValueError(f"{raw!r}: no port: write https://HOST:PORT, e.g. https://cp.example.com:6443")
    return authority


def _usable_ipv4(raw: str, ip: ipaddress.IPv4Address) -> str:
    # The same rule the nftables data path applies when it writes a backend.
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved:
        raise ValueError(f"{raw!r}: {ip} is not a unicast address a connection can go to")
    return str(ip)


def _usable_ipv6(raw: str, ip: ipaddress.IPv6Address) -> str:
    if ip.ipv4_mapped is not None:
        raise ValueError(f"{raw!r}: an IPv4-mapped IPv6 address: write it as {ip.ipv4_mapped}:PORT")
    if ip.is_unspecified or ip.is_multicast:
        raise ValueError(f"{raw!r}: {ip} is not a unicast address a connection can go to")
    if ip.is_link_local:
        raise ValueError(f"{raw!r}: {ip} is link-local, which needs a zone index: use a global or "
                         "unique local IPv6 address")
    return ip.compressed  # RFC 5952: one spelling per address


async def resolve(spec: EndpointSpec) -> list[Backend]:
    """The backends of one endpoint: itself for an IP, every A/AAAA answer for a name.

    Raises OSError (socket.gaierror) when a name does not resolve."""
    ip = spec.ip
    if ip is not None:
        return [Backend.of(ip, spec.port)]
    infos = await asyncio.get_running_loop().getaddrinfo(
        spec.host, spec.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    seen: dict[Backend, None] = {}
    for family, _type, _proto, _canon, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            seen[Backend.of(sockaddr[0].split("%")[0], spec.port)] = None
    return sorted(seen)
