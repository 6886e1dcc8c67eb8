"""Netlink transport for fast failover: a plain blocking AF_NETLINK socket
of our own, pyroute2's message classes and parser (Marshal).

pyroute2's socket classes (DiagSocket, NFCTSocket) are not used: in pyroute2
0.9 they drive a private asyncio event loop with run_until_complete(), which
raises "This event loop is already running" when called from the daemon's own
event loop (checked with 0.9.7). A request to a netlink *kernel* socket is
handled synchronously inside sendmsg(), so when send() returns every ack of
the batch is queued: one send and a few non-blocking reads per batch.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
from collections.abc import Iterator, Sequence

from pyroute2.netlink import NLMSG_DONE, nlmsg, nlmsgerr

try:
    from pyroute2.netlink.marshal import Marshal as _BaseMarshal
except ImportError:  # pyroute2 < 0.9
    from pyroute2.netlink.nlsocket import Marshal as _BaseMarshal

SOL_NETLINK = 270
NETLINK_CAP_ACK = 10       # acks carry only the request's header, not its payload
BATCH = 128                # requests per sendmsg(): their acks must fit the receive buffer
RCVBUF = 4 << 20
RECV_SIZE = 65536          # > the largest netlink skb (dumps: 32 KiB at most)
RECV_TIMEOUT = 2.0         # s: the kernel answers within sendmsg(); this is a safety net
SO_RCVBUFFORCE = 33


class Marshal(_BaseMarshal):
    """Parses acks (NLMSG_ERROR -> nlmsgerr, by the base class) and the
    message classes given."""

    def __init__(self, msg_map: dict[int, type] | None = None):
        super().__init__()
        self.msg_map = dict(msg_map or {})

    def parse_one_message(self, key, flags, sequence_number, data, offset, length):
        if key == self.error_type:
            # Only the errno: pyroute2 would also decode the echoed request as
            # msg_map's class for its type, and a dump request has the type of
            # its replies (SOCK_DIAG_BY_FAMILY) while NETLINK_CAP_ACK echoes
            # only its header: that decode fails (struct.error), so a dump
            # the kernel refused never raised its OSError.
            msg = nlmsgerr(data, offset=offset)
            msg.decode()
            return msg
        return super().parse_one_message(key, flags, sequence_number, data, offset, length)


class Socket:
    """A blocking netlink socket to the kernel (one protocol)."""

    def __init__(self, protocol: int):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
        try:
            self.sock.bind((0, 0))
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
            except OSError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            try:
                self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            except OSError:
                pass
        except BaseException:
            self.sock.close()
            raise
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Socket":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def next_seq(self) -> int:
        self.seq = (self.seq + 1) & 0xFFFFFFFF or 1
        return self.seq

    def _wait_readable(self, timeout: float) -> bool:
        return bool(select.select([self.sock], [], [], timeout)[0])

    def _recv_all(self, block: bool) -> bytes:
        """Whatever is queued; when `block`, first wait up to RECV_TIMEOUT for something."""
        if block and not self._wait_readable(RECV_TIMEOUT):
            return b""
        chunks = []
        while True:
            try:
                data = self.sock.recv(RECV_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            chunks.append(data)
        return b"".join(chunks)

    def request(self, msgs: Sequence[nlmsg], marshal: _BaseMarshal | None = None
                ) -> dict[int, tuple[int, list[nlmsg]]]:
        """Send messages that carry NLM_F_ACK (sequence numbers set by the
        caller, encoded) in batches; returns seq -> (error, answers): error 0 =
        done, else a positive errno; answers = the messages the kernel sent for
        that request before its ack (parsed with `marshal`: a GET's entry)."""
        marshal = marshal or Marshal()
        results: dict[int, tuple[int, list[nlmsg]]] = {}
        for start in range(0, len(msgs), BATCH):
            part = msgs[start:start + BATCH]
            want = {m["header"]["sequence_number"] for m in part}
            answers: dict[int, list[nlmsg]] = {seq: [] for seq in want}
            self.sock.send(b"".join(m.data for m in part))
            # The kernel socket handled the batch inside send(): answers are queued.
            block = False
            while want:
                data = self._recv_all(block)
                if not data:
                    if block:
                        break
                    block = True  # not expected; wait once for stragglers
                    continue
                for msg in marshal.parse(data):
                    seq = msg["header"]["sequence_number"]
                    if seq not in want:
                        continue
                    if isinstance(msg, nlmsgerr):
                        want.discard(seq)
                        results[seq] = (abs(msg["error"] or 0), answers[seq])
                    else:
                        answers[seq].append(msg)
            for seq in want:
                results[seq] = (errno.EIO, answers[seq])
        return results

    def request_acks(self, msgs: Sequence[nlmsg]) -> dict[int, int]:
        """request() when only the outcome matters: seq -> error."""
        return {seq: err for seq, (err, _) in self.request(msgs).items()}

    def dump(self, msg: nlmsg, marshal: _BaseMarshal) -> Iterator[nlmsg]:
        """Send one NLM_F_DUMP request (encoded by the caller: encoding twice
        appends a second copy to msg.data); yield the messages of the answer."""
        self.sock.send(msg.data)
        seq = msg["header"]["sequence_number"]
        while True:
            if not self._wait_readable(RECV_TIMEOUT):
                raise OSError(errno.ETIMEDOUT, f"netlink dump: no answer in {RECV_TIMEOUT} s")
            data = self.sock.recv(RECV_SIZE)
            for m in marshal.parse(data):
                if m["header"]["sequence_number"] != seq:
                    continue
                if m["header"]["type"] == NLMSG_DONE:
                    # NLMSG_DONE carries the dump's result: an error after its start
                    # (say, in the middle of the walk) is reported here, not as an ack.
                    err = done_errno(data, m)
                    if err:
                        raise OSError(err, f"netlink dump: {os.strerror(err)}")
                    return
                if isinstance(m, nlmsgerr):
                    err = abs(m["error"] or 0)
                    if err:
                        raise OSError(err, f"netlink dump: {os.strerror(err)}")
                    return
                yield m


def done_errno(data: bytes, msg: nlmsg) -> int:
    """The int after an NLMSG_DONE header (0 or -errno) as a positive errno."""
    off, length = getattr(msg, "offset", None), msg["header"]["length"]
    if off is None or length < 20:
        return 0
    return abs(struct.unpack_from("=i", data, off + 16)[0])
