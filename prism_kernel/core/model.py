"""Value types shared along the pipeline."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, order=True)
class Backend:
    """One address:port the kernel may steer a connection to.

    Ordering is (family, address, port) so that sorted sets are stable and an
    unchanged set compares equal (no kernel write)."""

    family: int  # 4 or 6; first so sorting groups families
    address: IPAddress
    port: int

    @classmethod
    def of(cls, address: str | IPAddress, port: int) -> "Backend":
        ip = ipaddress.ip_address(address)
        return cls(ip.version, ip, port)

    def __str__(self) -> str:
        if self.family == 6:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        return self.address.is_loopback
