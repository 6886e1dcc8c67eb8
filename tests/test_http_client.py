"""The HTTP/1.1 client (prism_kernel.probing.http_client) against raw servers
on loopback that answer with exactly the bytes a test gives: keep-alive,
chunked bodies, and what a hostile or broken server can send."""

from __future__ import annotations

import asyncio
import time

import pytest

from prism_kernel.probing.http_client import (
    READ_SIZE,
    BodyTooLarge,
    ConnectionClosed,
    HttpConnection,
    ProtocolError,
)


class RawServer:
    """Answers each request with the next item of `answers`: bytes, or an
    async function (writer) -> None for answers that take their time.
    After the last answer: `then` = "close" or "hold" (keep the connection)."""

    def __init__(self, *answers, then: str = "close"):
        self.answers = list(answers)
        self.then = then
        self.requests: list[bytes] = []
        self.connections = 0
        self.held = asyncio.Event()  # set when the server holds a connection open without answering

    async def handle(self, reader, writer):
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                if not self.answers:
                    break
                answer = self.answers.pop(0)
                if callable(answer):
                    await answer(writer)
                else:
                    writer.write(answer)
                    await writer.drain()
                if not self.answers:
                    break
            if self.then == "hold":
                self.held.set()
                await asyncio.sleep(30)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.transport.abort()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()

    async def connect(self, **kw) -> HttpConnection:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        return HttpConnection(reader, writer, f"127.0.0.1:{self.port}", **kw)


def run(coro, limit: float = 10):
    async def bounded():
        async with asyncio.timeout(limit):
            return await coro
    return asyncio.run(bounded())


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def test_keep_alive_two_requests_on_one_connection():
    async def go():
        async with RawServer(OK, b"HTTP/1.1 503 X\r\nContent-Length: 9\r\nX-A: 1\r\nX-A: 2\r\n\r\nnot ready") as srv:
            c = await srv.connect()
            r1 = await c.request("/readyz", [("User-Agent", "t")])
            assert (r1.status, await c.read_body(100)) == (200, b"ok") and c.reusable
            r2 = await c.request("/readyz")
            assert r2.status == 503 and r2.headers["x-a"] == "1, 2"
            assert await c.read_body(100) == b"not ready" and c.reusable
            assert srv.connections == 1 and c.requests == 2
            assert srv.requests[0].startswith(b"GET /readyz HTTP/1.1\r\n")
            assert b"host: 127.0.0.1:" in srv.requests[0].lower() and b"user-agent: t" in srv.requests[0].lower()
            c.close()
    run(go())


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\n\r\nok",  # the body runs to the end of the connection
])
def test_an_answer_that_ends_the_connection_is_not_reused(answer):
    async def go():
        async with RawServer(answer) as srv:
            c = await srv.connect()
            r = await c.request("/")
            assert r.status == 200 and await c.read_body(100) == b"ok"
            assert not c.reusable and c.closed
            with pytest.raises(RuntimeError):
                await c.request("/")
    run(go())


def test_bytes_after_the_answer_make_it_not_reusable():
    """Leftovers must never be read as the next answer's status line."""
    async def go():
        async with RawServer(OK + b"HTTP/1.1 200 OK\r\n\r\n", then="hold") as srv:
            c = await srv.connect()
            await c.request("/")
            await srv.held.wait()  # both answers were written before the body is read
            assert await c.read_body(100) == b"ok"
            assert not c.reusable
    run(go())


def test_1xx_skipped_and_chunked_body_with_trailers_in_pieces():
    async def slow(writer):
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (b"3\r\nabc\r\n", b"2\r\nde\r\n", b"0\r\nX-Trailer: 1\r\n\r\n"):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.02)

    async def go():
        async with RawServer(slow, OK) as srv:
            c = await srv.connect()
            r = await c.request("/stream")
            assert r.status == 200
            pieces = []
            while (p := await c.read_some()) is not None:
                pieces.append(p)
            assert b"".join(pieces) == b"abcde" and len(pieces) >= 2  # handed over as they came
            assert c.reusable
            await c.request("/")
            assert await c.read_body(10) == b"ok"
    run(go())


def test_read_some_hands_over_at_most_one_read():
    big = b"x" * (5 * READ_SIZE)
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(big), big)

    async def go():
        async with RawServer(answer) as srv:
            c = await srv.connect()
            await c.request("/")
            sizes = []
            while (p := await c.read_some()) is not None:
                sizes.append(len(p))
            assert sum(sizes) == len(big) and max(sizes) <= READ_SIZE
    run(go())


@pytest.mark.parametrize("answer,what", [
    (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", "a header over the limit"),
    (b"HTTP/1.1 200 OK\r\n" + b"X-Many: 1\r\n" * 3000 + b"\r\n", "many headers over the limit, in one read"),
    (b"HTTP/1.1 200 OK\r\n" + b"X-Many: 1\r\n" * 20000 + b"\r\n", "many headers over the limit, in reads"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 70000, "an endless chunk-size line"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: " + b"t" * 70000, "an endless trailer"),
    (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "not HTTP"),
    (b"HTTP/1.1 2000 OK\r\n\r\n", "a bad status code"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", "two lengths"),
])
def test_hostile_heads_are_protocol_errors_with_bounded_memory(answer, what):
    """The server holds the connection open after its bytes: the error must
    come from the limit or the parser, not from the end of the connection."""
    async def go():
        async with RawServer(answer, then="hold") as srv:
            c = await srv.connect(max_head_bytes=16 * 1024)
            with pytest.raises(ProtocolError):
                await c.request("/")
                await c.read_body(1 << 20)
            assert c.closed
    run(go())


def test_a_head_dribbled_forever_fails_at_the_limit():
    async def dribble(writer):
        writer.write(b"HTTP/1.1 200 OK\r\n")
        for _ in range(2000):
            writer.write(b"X-Slow: " + b"s" * 32 + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0)

    async def go():
        async with RawServer(dribble, then="hold") as srv:
            c = await srv.connect(max_head_bytes=4096)
            with pytest.raises(ProtocolError, match="too long"):
                await c.request("/")
    run(go())


def test_body_limits():
    declared_big = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\nabc"
    chunked_big = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"400\r\n" + b"y" * 1024 + b"\r\n"

    async def go():
        # a declared length over the limit fails at once, before waiting for the body
        async with RawServer(declared_big, then="hold") as srv:
            c = await srv.connect()
            await c.request("/")
            t0 = time.monotonic()
            with pytest.raises(BodyTooLarge):
                await c.read_body(64 * 1024)
            assert time.monotonic() - t0 < 1 and c.closed
        # a chunked body fails once past the limit (the server keeps sending)
        async with RawServer(chunked_big + b"400\r\n" + b"y" * 1024 + b"\r\n", then="hold") as srv:
            c = await srv.connect()
            await c.request("/")
            with pytest.raises(BodyTooLarge):
                await c.read_body(1500)
            assert c.closed
    run(go())


def test_the_server_closing_early():
    async def go():
        # before any answer: ConnectionClosed (an idle connection the server closed)
        async with RawServer() as srv:
            c = await srv.connect()
            with pytest.raises(ConnectionClosed, match="before an answer"):
                await c.request("/")
        # in the middle of the body: ConnectionClosed
        async with RawServer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc") as srv:
            c = await srv.connect()
            await c.request("/")
            with pytest.raises(ConnectionClosed, match="middle of the body"):
                await c.read_body(100)
        # in the middle of the head: what came was not an HTTP answer
        async with RawServer(b"HTTP/1.1 200 OK\r\nContent-Le") as srv:
            c = await srv.connect()
            with pytest.raises(ProtocolError):
                await c.request("/")
    run(go())


def test_first_byte_time_is_when_the_answer_started():
    async def late(writer):
        await asyncio.sleep(0.2)
        writer.write(OK)

    async def go():
        async with RawServer(late) as srv:
            c = await srv.connect()
            t0 = time.monotonic()
            r = await c.request("/")
            assert t0 <= r.sent_at < r.first_byte_at <= time.monotonic()
            assert 0.15 <= r.first_byte_at - r.sent_at < 1.0
    run(go())
