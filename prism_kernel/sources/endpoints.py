"""Endpoint sources: parse `HOST:PORT` specs and resolve them to backends.

A spec is `IPv4:PORT`, `[IPv6]:PORT` or `NAME:PORT` (optionally with an
`https://` prefix, as Kubernetes endpoints are usually written). A DNS name is
resolved by the daemon and re-resolved periodically; every address it yields is
a backend of its own, probed separately.
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


@dataclass(frozen=True)
class EndpointSpec:
    """One configured endpoint, as the operator wrote it."""

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

    def __str__(self) -> str:
        ip = self.ip
        if ip is not None and ip.version == 6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_endpoint(text: str) -> EndpointSpec:
    """Parse one endpoint spec; ValueError names what is wrong with it."""
    raw = text
    text = text.strip()
    if text.startswith("https://"):
        text = text[len("https://"):].rstrip("/")
    elif "://" in text:
        raise ValueError(f"{raw!r}: only https:// URLs or HOST:PORT are accepted")
    if not text:
        raise ValueError("empty endpoint")
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1:].startswith(":"):
            raise ValueError(f"{raw!r}: expected [IPv6]:PORT")
        host, port_text = text[1:end], text[end + 2:]
        try:
            if ipaddress.ip_address(host).version != 6:
                raise ValueError
        except ValueError:
            raise ValueError(f"{raw!r}: {host!r} in brackets is not an IPv6 address") from None
    else:
        if text.count(":") > 1:
            raise ValueError(f"{raw!r}: an IPv6 address must be written in brackets, as [ADDR]:PORT")
        if ":" not in text:
            raise ValueError(f"{raw!r}: no port (expected HOST:PORT, e.g. 10.0.0.1:6443)")
        host, port_text = text.rsplit(":", 1)
        if not host:
            raise ValueError(f"{raw!r}: no host before the port")
        if not _is_ipv4(host):
            if re.fullmatch(r"[0-9.]+", host):
                raise ValueError(f"{raw!r}: {host!r} is not a valid IPv4 address")
            if not _HOSTNAME_RE.match(host):
                raise ValueError(f"{raw!r}: {host!r} is neither an IP address nor a valid DNS name")
    if not port_text.isdigit():
        raise ValueError(f"{raw!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{raw!r}: port {port} is out of range 1-65535")
    return EndpointSpec(host.rstrip(".") if not _is_ipv4(host) else host, port)


def _is_ipv4(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 4
    except ValueError:
        return False


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
