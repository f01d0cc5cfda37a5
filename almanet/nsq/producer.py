"""Publishing to nsqd: PUB, MPUB and DPUB pipelined on one connection, with failover.

Any number of publishes may be in flight on the connection; nsqd answers
them in order and each caller gets its own answer. Without a connection, a
publish connects to the first nsqd address that answers, starting with the
last one that worked: nothing reconnects in the background, and a publish
never waits longer than a connection attempt per address. Publishes in flight
when the connection is lost fail at once with ``ConnectionError``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence

from almanet._speedups.frames import encode_dpub, encode_mpub, encode_pub
from almanet.nsq.connection import Connection, ConnectionOptions
from almanet.nsq.protocol import DEFAULT_MAX_BODY_SIZE, DEFAULT_MAX_MSG_SIZE

logger = logging.getLogger("almanet.nsq")


class Producer:
    """Publishes to the first reachable of ``nsqd_tcp_addresses`` (``host:port``)."""

    def __init__(
        self,
        *nsqd_tcp_addresses: str,
        options: ConnectionOptions | None = None,
        max_msg_size: int = DEFAULT_MAX_MSG_SIZE,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    ) -> None:
        if not nsqd_tcp_addresses:
            raise ValueError("a producer needs at least one nsqd address")
        self.addresses = list(nsqd_tcp_addresses)
        self.options = options or ConnectionOptions()
        self.max_msg_size = max_msg_size
        self.max_body_size = max_body_size
        self._connection: Connection | None = None
        self._connecting: asyncio.Future[Connection] | None = None
        self._next_address = 0
        self._closed = False

    async def __aenter__(self) -> Producer:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def publish(self, topic: str, body: bytes, *, delay: float = 0.0) -> Awaitable[bytes]:
        """Publish one message (PUB), or defer it by ``delay`` seconds (DPUB).

        The arguments are checked at once (``ValueError``, ``TypeError``); the
        awaitable completes with nsqd's ``OK``, or raises ``CommandError`` or
        ``ConnectionError``. A plain function returning the pending answer:
        no coroutine per publish on this hot path.
        """
        command = encode_dpub(topic, round(delay * 1000), body) if delay else encode_pub(topic, body)
        if len(body) > self.max_msg_size:
            raise ValueError(f"a message of {len(body)} bytes exceeds max_msg_size ({self.max_msg_size})")
        return self._request(command)

    def publish_batch(self, topic: str, bodies: Sequence[bytes]) -> Awaitable[bytes]:
        """Publish several messages in one MPUB: all of them or, on error, none (as ``publish``)."""
        command = encode_mpub(topic, bodies)
        for body in bodies:
            if len(body) > self.max_msg_size:
                raise ValueError(f"a message of {len(body)} bytes exceeds max_msg_size ({self.max_msg_size})")
        body_size = 4 + sum(4 + len(body) for body in bodies)  # count, then each size and body
        if body_size > self.max_body_size:
            raise ValueError(f"the batch of {body_size} bytes exceeds max_body_size ({self.max_body_size})")
        return self._request(command)

    def _request(self, command: bytes) -> Awaitable[bytes]:
        connection = self._connection
        if connection is not None and connection.is_open:
            return connection.request(command)
        return asyncio.ensure_future(self._connect_and_request(command))

    async def _connect_and_request(self, command: bytes) -> bytes:
        connection = await self.connect()
        return await connection.request(command)

    async def connect(self) -> Connection:
        """The live connection, opened if need be (trying each address once)."""
        connection = self._connection
        if connection is not None and connection.is_open:
            return connection
        if self._closed:
            raise ConnectionError("the producer is closed")
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open_first())
        try:
            return await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    async def close(self) -> None:
        """Close the connection once the publishes in flight are answered."""
        self._closed = True
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.wait_answered()
            await connection.close()

    async def _open_first(self) -> Connection:
        errors = []
        count = len(self.addresses)
        for offset in range(count):
            index = (self._next_address + offset) % count
            address = self.addresses[index]
            try:
                connection = await Connection.open(address, self.options)
            except ConnectionError as error:
                errors.append(str(error))
                continue
            if self._closed:  # while connecting
                await connection.close()
                raise ConnectionError("the producer is closed")
            if offset:
                logger.warning("publishing to %s (failed over: %s)", address, "; ".join(errors))
            self._next_address = index
            self._connection = connection
            return connection
        raise ConnectionError("no nsqd reachable: " + "; ".join(errors))
