"""Fake NSQ servers for client tests: an nsqd that does what the test says, and an nsqlookupd.

``FakeNsqd`` serves every client connection with a coroutine of the test's
own, on a ``FakeClient``: the client's commands come in parsed by the codec's
``CommandParser``, and the test sends whatever bytes it likes back. A failed
assertion in a serving coroutine fails the test when the fake exits.
``FakeLookupd`` answers ``/lookup`` with the nsqd addresses the test lists.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from almanet._speedups.frames import Command, CommandParser, encode_response
from almanet.wire.protocol import (
    CLOSE_WAIT,
    DEFAULT_MAX_BODY_SIZE,
    DEFAULT_MAX_MSG_SIZE,
    DEFAULT_MAX_REQ_TIMEOUT_MS,
    OK,
)

# Long enough for a loaded CI machine; waits that succeed return at once.
TIMEOUT = 5.0

# What nsqd answers a feature-negotiating IDENTIFY with.
NSQD_NEGOTIATED = {
    "max_rdy_count": 2500,
    "version": "1.3.0",
    "max_msg_timeout": 900000,
    "msg_timeout": 60000,
    "tls_v1": False,
    "deflate": False,
    "deflate_level": 6,
    "max_deflate_level": 6,
    "snappy": False,
    "sample_rate": 0,
    "auth_required": False,
    "output_buffer_size": 16384,
    "output_buffer_timeout": 250,
}


class FakeClient:
    """The fake nsqd's end of one client connection (``number`` counts from 0 in accept order)."""

    def __init__(self, number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.number = number
        self.commands: list[Command] = []  # everything the client sent, in order (but handshake()'s probe)
        self._reader = reader
        self._writer = writer
        self._parser = CommandParser(DEFAULT_MAX_MSG_SIZE, DEFAULT_MAX_BODY_SIZE, DEFAULT_MAX_REQ_TIMEOUT_MS)
        self._pending: list[Command] = []

    async def command(self, timeout: float = TIMEOUT) -> Command:
        """The client's next command; EOFError if it closes the connection instead."""
        while not self._pending:
            data = await asyncio.wait_for(self._reader.read(65536), timeout)
            if not data:
                raise EOFError(f"client {self.number} closed the connection")
            self._parser.feed(data)
            self._pending.extend(self._parser)
        command = self._pending.pop(0)
        self.commands.append(command)
        return command

    async def expect(self, name: bytes, *params: bytes) -> Command:
        """The next command, which must be ``name`` (with ``params`` if given)."""
        command = await self.command()
        assert command.name == name, command
        if params:
            assert command.params == list(params), command
        return command

    def send(self, data: bytes) -> None:
        self._writer.write(data)

    async def handshake(self, **negotiated: Any) -> dict[str, Any]:
        """Answer IDENTIFY as nsqd does, changed by ``negotiated``; returns what the client identified with.

        Also the client's probe for ``--tls-required`` that follows IDENTIFY in
        its write (NOP, then IDENTIFY without feature negotiation): OK, and
        left out of ``commands``.
        """
        identify = await self.expect(b"IDENTIFY")
        assert identify.body is not None
        self.send(encode_response(json.dumps({**NSQD_NEGOTIATED, **negotiated}).encode()))
        identified: dict[str, Any] = json.loads(identify.body)
        if self._pending and self._pending[0].name == b"NOP":
            await self.expect(b"NOP")
            probe = await self.expect(b"IDENTIFY")
            assert probe.body is not None and not json.loads(probe.body).get("feature_negotiation")
            self.send(encode_response(OK))
            del self.commands[-2:]
        return identified

    async def subscribe(self) -> None:
        """The handshake and an OK to SUB."""
        await self.handshake()
        await self.expect(b"SUB")
        self.send(encode_response(OK))

    async def answer_publishes(self) -> None:
        """OK to every PUB, MPUB and DPUB until the client closes the connection."""
        with contextlib.suppress(EOFError):
            while True:
                if (await self.command()).name in (b"PUB", b"MPUB", b"DPUB"):
                    self.send(encode_response(OK))

    async def closed(self, timeout: float = TIMEOUT, *, answer_cls: bool = True) -> None:
        """Wait for the client to close the connection, recording what it sends (and answering CLS)."""
        with contextlib.suppress(EOFError, ConnectionResetError):
            while True:
                if (await self.command(timeout)).name == b"CLS" and answer_cls:
                    self.send(encode_response(CLOSE_WAIT))


class FakeNsqd:
    """A server on a free loopback port that serves each connection with ``serve``, then closes it."""

    def __init__(self, serve: Callable[[FakeClient], Awaitable[None]]) -> None:
        self.clients: list[FakeClient] = []
        self.accepted: list[float] = []  # time.monotonic() of each connection
        self.served = 0  # connections served to the end
        self.address = ""
        self._serve = serve
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._errors: list[BaseException] = []

    async def __aenter__(self) -> FakeNsqd:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, exc_type: object, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        if self._errors and exc_type is None:
            raise self._errors[0]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = FakeClient(len(self.clients), reader, writer)
        self.clients.append(client)
        self.accepted.append(time.monotonic())
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(client)
            self.served += 1
        except asyncio.CancelledError:
            pass
        except BaseException as error:
            self._errors.append(error)
        finally:
            writer.close()
            self._tasks.discard(task)


class FakeLookupd:
    """An nsqlookupd whose ``/lookup`` lists the nsqd TCP addresses in ``producers``, whatever the topic."""

    def __init__(self) -> None:
        self.producers: list[str] = []
        self.http_address = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> FakeLookupd:
        self._server = await asyncio.start_server(self._lookup, "127.0.0.1", 0)
        self.http_address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _lookup(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        producers = []
        for address in self.producers:
            host, _, port = address.rpartition(":")
            producers.append({"broadcast_address": host, "tcp_port": int(port)})
        body = json.dumps({"channels": [], "producers": producers}).encode()
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        writer.close()
