"""Who already listens where prism-kernel would steer: 127.0.0.1:PORT and
[::1]:PORT (issue 12). Both data paths rewrite a connect to that address
before it reaches a listener, so starting over one silently takes its port
(on Talos, KubePrism's 7445). `run` refuses unless the operator opts in
(`take_over_listen_address`), and `doctor` fails the check.

Found with one sock_diag dump per family of the sockets in TCP_LISTEN on
PORT (the kernel filters by state and port, so a node's other sockets are not
even sent; /proc/net/tcp would be the whole table as text), then each
socket's inode mapped to its process through /proc/*/fd (best effort: root
sees every process). Read-only, in the caller's network namespace.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass

TCP_LISTEN = 10

# Local addresses whose listener a connect to 127.0.0.1 or [::1] reaches:
# the address itself, the wildcard, and 127.0.0.1 as an IPv4-mapped address
# (a dual-stack socket).
_REACHED = {
    socket.AF_INET: {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("0.0.0.0")},
    socket.AF_INET6: {ipaddress.ip_address("::1"), ipaddress.ip_address("::"),
                      ipaddress.ip_address("::ffff:127.0.0.1"), ipaddress.ip_address("::ffff:0.0.0.0")},
}


@dataclass(frozen=True)
class Listener:
    address: str              # "127.0.0.1:7445", "[::]:7445"
    inode: int
    pids: tuple[int, ...] = ()  # owners found in /proc (empty: not found, e.g. not root)
    process: str | None = None  # "comm (pid N)[, ...]", for messages

    def as_dict(self) -> dict:
        return {"address": self.address, "inode": self.inode, "pids": list(self.pids), "process": self.process}


def describe(found: list[Listener]) -> str:
    return ", ".join(l.address + (f" ({l.process})" if l.process else " (process not found)") for l in found)


def foreign(found: list[Listener], own_pid: int) -> list[Listener]:
    """The listeners that are not the calling process's own: a socket only
    this process holds is ours (the daemon itself never listens there, but a
    test or an embedding might), one nobody could be found for counts."""
    return [l for l in found if not l.pids or set(l.pids) != {own_pid}]


def refusal(found: list[Listener], port: int, take_over: bool, own_pid: int) -> str | None:
    """Why `run` (or a reload to PORT) must not go ahead, or None. Pure."""
    others = foreign(found, own_pid)
    if not others or take_over:
        return None
    return (f"port (--port) {port}: {describe(others)} already listens where prism-kernel would steer "
            f"(127.0.0.1:{port} and [::1]:{port}); every connect there would go to a backend instead "
            "of that listener. Use another port, stop that listener, or, to replace it deliberately "
            "(e.g. instead of Talos KubePrism), set take_over_listen_address: true "
            "(--take-over-listen-address)")


def listening(port: int) -> list[Listener]:
    """Sockets in TCP_LISTEN on PORT that a connect to 127.0.0.1:PORT or
    [::1]:PORT would reach, with their owning processes when found."""
    from pyroute2.netlink import NETLINK_SOCK_DIAG, NLM_F_DUMP, NLM_F_REQUEST  # noqa: PLC0415
    from pyroute2.netlink.diag import SOCK_DIAG_BY_FAMILY, inet_diag_msg, inet_diag_req  # noqa: PLC0415

    from prism_kernel.datapath.netlink.sockets import _diag_req  # noqa: PLC0415
    from prism_kernel.datapath.netlink.transport import Marshal, Socket  # noqa: PLC0415

    raw: list[tuple[str, int]] = []
    with Socket(NETLINK_SOCK_DIAG) as nl:
        for family in (socket.AF_INET, socket.AF_INET6):
            req = _diag_req(inet_diag_req(), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, family,
                            1 << TCP_LISTEN, sport=port)
            req["header"]["sequence_number"] = nl.next_seq()
            req.encode()
            for m in nl.dump(req, Marshal({SOCK_DIAG_BY_FAMILY: inet_diag_msg})):
                if m["idiag_sport"] != port or m["idiag_state"] != TCP_LISTEN:
                    continue  # the kernel filtered already; kept as the contract
                addr = ipaddress.ip_address(m["idiag_src"])
                if addr not in _REACHED[family]:
                    continue
                text = f"[{addr}]:{port}" if family == socket.AF_INET6 else f"{addr}:{port}"
                raw.append((text, m["idiag_inode"]))
    owners = socket_owners({inode for _, inode in raw}) if raw else {}
    out = []
    for text, inode in raw:
        pids = tuple(sorted(owners.get(inode, {})))
        process = ", ".join(f"{owners[inode][p]} (pid {p})" for p in pids) or None
        out.append(Listener(text, inode, pids, process))
    return out


def socket_owners(inodes: set[int]) -> dict[int, dict[int, str]]:
    """inode -> {pid: comm} of the processes holding each socket, from
    /proc/*/fd. Every process is looked at (a socket may be shared, e.g.
    after fork); unreadable ones are skipped."""
    found: dict[int, dict[int, str]] = {}
    want = {f"socket:[{i}]": i for i in inodes}
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target in want:
                try:
                    with open(f"/proc/{pid}/comm") as f:
                        comm = f.read().strip()
                except OSError:
                    comm = "?"
                found.setdefault(want[target], {})[int(pid)] = comm
    return found


def check(port: int, take_over: bool) -> tuple[str | None, list[Listener]]:
    """(refusal or None, the listeners found) for this process. A kernel
    query: the daemon runs it on its writer thread."""
    found = listening(port)
    return refusal(found, port, take_over, os.getpid()), found
