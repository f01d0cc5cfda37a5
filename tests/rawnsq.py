"""A bare NSQ protocol V2 connection for broker tests: bytes out, frames in, through the codec."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from almanet._speedups.frames import (
    ErrorFrame,
    FrameReader,
    MessageFrame,
    ResponseFrame,
    encode_identify,
    encode_rdy,
    encode_sub,
)
from almanet.wire.protocol import HEARTBEAT, MAGIC_V2, OK

Frame = ResponseFrame | ErrorFrame | MessageFrame

# Long enough for a loaded CI machine; tests waiting for something that must
# not happen use short explicit timeouts instead.
TIMEOUT = 5.0
# How late a deferred or timed-out message may come back: nsqd (and the
# embedded broker) find them in a scan every 100 ms of a list of channels
# refreshed every 5 s, so a new channel's are found up to 5.1 s late.
QUEUE_SCAN_LATENESS = 5.1


class RawConnection:
    """One client connection; ``frame()`` waits for the next frame, skipping heartbeats unless asked."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._frames = FrameReader()
        self._pending: list[Frame] = []

    @classmethod
    async def open(cls, address: str, *, magic: bool = True) -> RawConnection:
        host, _, port = address.rpartition(":")
        connection = cls(*await asyncio.open_connection(host, int(port)))
        if magic:
            connection.send(MAGIC_V2)
        return connection

    @classmethod
    async def consumer(cls, address: str, topic: str, channel: str, rdy: int = 1, **identify: Any) -> RawConnection:
        """A connection subscribed to ``topic``/``channel`` with RDY ``rdy`` (IDENTIFY first if given)."""
        connection = await cls.open(address)
        if identify:
            await connection.identify(**identify)
        connection.send(encode_sub(topic, channel))
        assert await connection.frame() == ResponseFrame(OK)
        if rdy:
            connection.send(encode_rdy(rdy))
        return connection

    async def identify(self, **settings: Any) -> dict[str, Any]:
        self.send(encode_identify({"feature_negotiation": True, **settings}))
        frame = await self.frame()
        assert isinstance(frame, ResponseFrame), frame
        negotiated: dict[str, Any] = json.loads(frame.data)
        return negotiated

    def send(self, data: bytes) -> None:
        self._writer.write(data)

    def send_eof(self) -> None:
        """Close the sending side: the broker reads the end of the stream, and may still answer."""
        self._writer.write_eof()

    async def frame(self, timeout: float = TIMEOUT, *, heartbeats: bool = False) -> Frame:
        while True:
            while not self._pending:
                data = await asyncio.wait_for(self._reader.read(65536), timeout)
                if not data:
                    raise ConnectionResetError("the broker closed the connection")
                self._frames.feed(data)
                self._pending.extend(self._frames)
            frame = self._pending.pop(0)
            if heartbeats or frame != ResponseFrame(HEARTBEAT):
                return frame

    async def message(self, timeout: float = TIMEOUT) -> MessageFrame:
        frame = await self.frame(timeout)
        assert isinstance(frame, MessageFrame), frame
        return frame

    async def messages(self, count: int, timeout: float = TIMEOUT) -> list[MessageFrame]:
        return [await self.message(timeout) for _ in range(count)]

    async def nothing(self, timeout: float = 0.2) -> None:
        """Assert that no frame but heartbeats arrives within ``timeout``."""
        try:
            frame = await self.frame(timeout)
        except asyncio.TimeoutError:
            return
        raise AssertionError(f"unexpected {frame}")

    async def error_then_closed(self) -> bytes:
        """The error frame the broker sent before closing the connection."""
        frame = await self.frame()
        assert isinstance(frame, ErrorFrame), frame
        await self.closed()
        return frame.data

    async def closed(self, timeout: float = TIMEOUT) -> None:
        """Wait for the broker to close the connection (frames other than heartbeats fail)."""
        while True:
            try:
                frame = await self.frame(timeout)
            except ConnectionResetError:
                return
            raise AssertionError(f"expected the connection to close, got {frame}")

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()
