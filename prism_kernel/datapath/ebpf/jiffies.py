"""The kernel's tick rate (HZ), found at run time: the sockops reply to
BPF_SOCK_OPS_TIMEOUT_INIT is an RTO in jiffies, and HZ is a build option
(100, 250, 300, 1000, ...) that no interface reports directly.

SO_RCVTIMEO is kept in jiffies: setting it to 1 us rounds up to one jiffy
(sock_set_timeout: DIV_ROUND_UP(usec, USEC_PER_SEC / HZ)), and reading it back
gives that jiffy in microseconds ((1 * USEC_PER_SEC) / HZ, sock_get_timeout).
The same code since long before 5.10, unprivileged, no kernel config file
needed. When the answer is not a whole HZ, None: the caller then writes no
RTO (the kernel default), never one of an assumed HZ that could be shorter
than asked.
"""

from __future__ import annotations

import functools
import socket
import struct

_TIMEVAL = struct.Struct("@ll")  # struct timeval (SO_RCVTIMEO_OLD) on a 64-bit host


@functools.cache
def kernel_hz() -> int | None:
    """HZ of the running kernel, or None when it cannot be told."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.pack(0, 1))
            sec, usec = _TIMEVAL.unpack(s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.size))
    except (OSError, struct.error):
        return None
    return hz_from_jiffy_us(sec, usec)


def hz_from_jiffy_us(sec: int, usec: int) -> int | None:
    """HZ from one jiffy as SO_RCVTIMEO reports it; None unless the answer
    is a plausible tick rate. The kernel's division truncates (1e6 // 300 =
    3333, 1e6 // 1024 = 976, which 1023 gives too): the largest HZ that
    gives `usec` is taken, so a timer converted with it is never shorter
    than asked."""
    if sec != 0 or usec <= 0:
        return None
    hz = 1_000_000 // usec
    if not 24 <= hz <= 10_000 or 1_000_000 // hz != usec:
        return None
    return hz
