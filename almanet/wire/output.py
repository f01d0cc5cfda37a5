"""Writes coalesced per event-loop iteration, for both ends of an NSQ connection."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class CoalescedOutput:
    """Bytes for one transport, written together once per event-loop iteration.

    A connection handles many commands or frames in one ``data_received``;
    one ``transport.write`` for all of them saves a system call per item.
    ``before_flush`` lets the owner add, at the last moment, what it
    coalesces itself (the client's publishes, joined into MPUBs).
    """

    __slots__ = ("_before_flush", "_chunks", "_loop", "_scheduled", "_transport")

    def __init__(self, loop: asyncio.AbstractEventLoop, before_flush: Callable[[], None] | None = None) -> None:
        self._loop = loop
        self._before_flush = before_flush
        self._transport: asyncio.WriteTransport | None = None
        self._chunks: list[bytes] = []
        self._scheduled = False

    def attach(self, transport: asyncio.WriteTransport) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        self._chunks.append(data)
        if not self._scheduled:
            self.schedule()

    def schedule(self) -> None:
        """Flush at the end of this loop iteration."""
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write what is pending now (also before closing, so nothing is lost)."""
        if self._before_flush is not None:
            self._before_flush()
        self._scheduled = False
        chunks = self._chunks
        transport = self._transport
        if chunks and transport is not None and not transport.is_closing():
            transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        chunks.clear()

    def discard(self) -> None:
        self._chunks.clear()
