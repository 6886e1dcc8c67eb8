"""sd_notify(3) with the standard library: one datagram to $NOTIFY_SOCKET.

The systemd unit is `Type=notify`: the daemon sends READY=1 once the data
path steers (installed or adopted, and the first backend set written), so
`Before=kubelet.service` means the steering is in place; STATUS= lines say
what it is doing (`systemctl status`). Without $NOTIFY_SOCKET (not started by
systemd, or the DaemonSet) nothing is sent. A path starting with '@' is in
the abstract namespace.
"""

from __future__ import annotations

import os
import socket


def _one_line(value: str | int, limit: int = 400) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def notify(**fields: str | int) -> bool:
    """Send `KEY=value` lines (e.g. READY=1, STATUS=...); True when sent.
    A value is made one line: the protocol is newline-separated."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path or path[0] not in "/@":
        return False
    addr = "\0" + path[1:] if path[0] == "@" else path
    msg = "\n".join(f"{k}={_one_line(v)}" for k, v in fields.items())
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(msg.encode())
    except OSError:
        return False  # systemd gone or the socket not ours: never fatal
    return True
