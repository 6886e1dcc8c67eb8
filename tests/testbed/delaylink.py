"""A link delay without netem: a TUN device whose packets come back after a delay.

    ip netns exec NS python -m tests.testbed.delaylink --dev pkdly --delay 0.08

Run in a backend's namespace by `FakeApiServer.link_delay()`, which routes
every packet the namespace sends to another host into the TUN device (policy
rule `iif lo` -> table with `default dev <tun>`); this process reads each
packet and writes it back into the same device after `--delay` seconds, so it
re-enters the namespace as received from the TUN device and is forwarded out
of eth0 as usual. Everything the backend sends (SYN-ACKs, data, ACKs) is late
by the delay: the round-trip time of every connection to it grows by it, the
TCP handshake included, which a server delaying its own answers cannot do.
This kernel has neither netem nor fq, hence the relay.

Packets keep their order (one FIFO, one delay). Prints "ready" once the device
exists; exits on SIGTERM or when its stdin closes (the testbed holds it).
"""

from __future__ import annotations

import argparse
import collections
import fcntl
import os
import select
import signal
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def relay(fd: int, delay: float, stdin: int) -> None:
    queue: collections.deque[tuple[float, bytes]] = collections.deque()
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    poller.register(stdin, select.POLLIN | select.POLLHUP)
    while True:
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            try:
                os.write(fd, queue.popleft()[1])
            except OSError:
                pass  # the device went away with its namespace, or the packet was refused
        wait_ms = -1 if not queue else max(0, int((queue[0][0] - now) * 1000) + 1)
        for f, ev in poller.poll(wait_ms):
            if f == stdin:
                return  # the testbed closed our stdin (or died): stop
            while True:
                try:
                    pkt = os.read(fd, 65536)
                except BlockingIOError:
                    break
                queue.append((time.monotonic() + delay, pkt))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.testbed.delaylink")
    ap.add_argument("--dev", required=True)
    ap.add_argument("--delay", type=float, required=True, help="seconds")
    a = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    fd = open_tun(a.dev)
    print("ready", flush=True)
    relay(fd, a.delay, sys.stdin.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
