"""One HTTP/1.1 client connection: h11 speaks the protocol, asyncio streams
(plain or TLS) carry the bytes. The readyz probe keeps one per backend alive
between probes; discovery lists and then watches (chunked, long-lived) on one.

One request at a time. No timeouts here: each caller bounds its exchange with
its own deadline (asyncio.timeout), as a probe and a watch need different ones.

What a hostile or broken server can make it hold: the response head (status
line and headers), each chunk-size line and the trailers must each fit in
`max_head_bytes` (h11's max_incomplete_event_size), else ProtocolError; the
body is bounded by the caller (`read_body(limit)`) or taken piece by piece
(`read_some()`: at most one socket read plus one head's worth at a time).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass

import h11

READ_SIZE = 64 * 1024
DEFAULT_MAX_HEAD_BYTES = 16 * 1024


class HttpError(Exception):
    """The server did not give a complete, well-formed HTTP/1.1 answer."""


class ProtocolError(HttpError):
    """Not HTTP/1.1 as the RFC has it, or over one of our limits."""


class BodyTooLarge(ProtocolError):
    """The body is larger than the caller's limit."""


class ConnectionClosed(HttpError):
    """The server closed the connection before its answer was complete."""


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # names in lower case; a repeated field's values joined by ", "
    # time.monotonic() when the request was handed to the transport, and when
    # the first byte of the answer arrived: their difference is one round trip
    # plus the server's time, without our own encoding and parsing.
    sent_at: float
    first_byte_at: float


class HttpConnection:
    """A client connection over established streams (the caller connected,
    and did the TLS handshake: it knows which phase failed). Not task-safe."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host_header: str,
                 *, max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES):
        self._reader = reader
        self._writer = writer
        self._host_header = host_header
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head_bytes)
        self._max_head_bytes = max_head_bytes
        self._eof = False
        self._received = 0  # bytes of the current answer so far
        self._first_at: float | None = None
        self._head_done = False
        self._body_ended = False
        self._declared: int | None = None  # the answer's Content-Length
        self.requests = 0
        self.peer = writer.get_extra_info("peername")

    @property
    def closed(self) -> bool:
        return self._writer.transport.is_closing()

    @property
    def reusable(self) -> bool:
        """Ready for the next request: the last answer was read to its end
        and neither side asked to close."""
        return (not self.closed and self._h11.our_state is h11.IDLE
                and self._h11.their_state is h11.IDLE)

    def close(self) -> None:
        """Abort (no FIN handshake to wait for); callable from sync code."""
        self._writer.transport.abort()

    async def request(self, target: str, headers: Iterable[tuple[str, str]] = (),
                      method: str = "GET") -> Response:
        """Send a request without a body and read the answer's head (1xx
        answers skipped). The body is read next, with read_body or read_some."""
        if not self.reusable:
            raise RuntimeError("request on a connection that is not idle")
        self.requests += 1
        self._received, self._first_at = 0, None
        self._head_done, self._body_ended, self._declared = False, False, None
        out = self._h11.send(h11.Request(method=method, target=target,
                                         headers=[("Host", self._host_header), *headers]))
        out += self._h11.send(h11.EndOfMessage())
        sent_at = time.monotonic()
        self._writer.write(out)
        await self._writer.drain()
        while True:
            ev = await self._next_event()
            if isinstance(ev, h11.InformationalResponse):
                continue  # 100 Continue and friends: the real answer follows
            if isinstance(ev, h11.Response):
                # h11 bounds a head still incomplete; one that came whole in a
                # single read is held to the same limit here.
                if self._received - len(self._h11.trailing_data[0]) > self._max_head_bytes:
                    self.close()
                    raise ProtocolError(f"bad HTTP response: head larger than {self._max_head_bytes} bytes")
                self._head_done = True
                hdrs: dict[str, str] = {}
                for name, value in ev.headers:
                    k, v = name.decode("latin-1"), value.decode("latin-1")
                    hdrs[k] = f"{hdrs[k]}, {v}" if k in hdrs else v
                length = hdrs.get("content-length", "")
                self._declared = int(length) if length.isdigit() else None
                assert self._first_at is not None  # an event came from bytes read
                return Response(ev.status_code, hdrs, sent_at, self._first_at)
            raise ProtocolError(f"bad HTTP response: {type(ev).__name__} before the status line")

    async def read_some(self) -> bytes | None:
        """The body bytes available now (waiting for some when there are
        none), or None once the body has ended."""
        parts: list[bytes] = []
        while not self._body_ended:
            ev = self._poll_event()
            if ev is h11.NEED_DATA:
                if parts:
                    break  # hand over what came; the rest is a later read
                await self._receive()
            elif isinstance(ev, h11.Data):
                parts.append(bytes(ev.data))
            elif isinstance(ev, h11.EndOfMessage):
                self._end_of_body()
            else:
                self.close()
                raise ProtocolError(f"bad HTTP response: {type(ev).__name__} in the body")
        return b"".join(parts) if parts else None

    async def read_body(self, limit: int) -> bytes:
        """The whole body; BodyTooLarge past `limit` bytes (at once when the
        declared Content-Length is over it)."""
        if self._declared is not None and self._declared > limit:
            self.close()
            raise BodyTooLarge(f"response body of {self._declared} bytes, more than {limit}")
        parts, total = [], 0
        while (data := await self.read_some()) is not None:
            total += len(data)
            if total > limit:
                self.close()
                raise BodyTooLarge(f"response body larger than {limit} bytes")
            parts.append(data)
        return b"".join(parts)

    # ---- internals ---------------------------------------------------------

    def _poll_event(self) -> h11.Event | type[h11.NEED_DATA]:
        """The next event from what was received so far, or NEED_DATA."""
        try:
            ev = self._h11.next_event()
        except h11.RemoteProtocolError as e:
            self.close()
            if self._eof and (self._received == 0 or self._head_done):
                raise ConnectionClosed(self._closed_while()) from None
            raise ProtocolError(f"bad HTTP response: {e}") from None
        if isinstance(ev, h11.ConnectionClosed):
            self.close()
            raise ConnectionClosed(self._closed_while())
        if ev is h11.PAUSED:  # cannot happen while an answer is read; never wait on it
            self.close()
            raise ProtocolError("bad HTTP response: data after the end of the answer")
        return ev

    async def _next_event(self) -> h11.Event:
        while (ev := self._poll_event()) is h11.NEED_DATA:
            await self._receive()
        return ev

    async def _receive(self) -> None:
        data = await self._reader.read(READ_SIZE)
        if data:
            if self._first_at is None:
                self._first_at = time.monotonic()
            self._received += len(data)
        else:
            self._eof = True
        self._h11.receive_data(data)  # b"": the server closed its side

    def _end_of_body(self) -> None:
        self._body_ended = True
        data, eof = self._h11.trailing_data
        if self._h11.their_state is h11.DONE and self._h11.our_state is h11.DONE and not data and not eof:
            self._h11.start_next_cycle()
        else:  # the server closes (or closed) after this answer, or sent bytes nobody asked for
            self.close()

    def _closed_while(self) -> str:
        if self._head_done:
            return "connection closed by peer in the middle of the body"
        return "connection closed by peer before an answer"
