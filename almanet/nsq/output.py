"""Writes coalesced per event-loop iteration, for both ends of an NSQ connection."""

from __future__ import annotations

import asyncio


class CoalescedOutput:
    """Bytes for one transport, written together once per event-loop iteration.

    A connection handles many commands or frames in one ``data_received``;
    one ``transport.write`` for all of them saves a system call per item.
    """

    __slots__ = ("_chunks", "_loop", "_transport")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._transport: asyncio.WriteTransport | None = None
        self._chunks: list[bytes] = []

    def attach(self, transport: asyncio.WriteTransport) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        if not self._chunks:
            self._loop.call_soon(self.flush)
        self._chunks.append(data)

    def flush(self) -> None:
        """Write what is pending now (also before closing, so nothing is lost)."""
        chunks = self._chunks
        transport = self._transport
        if chunks and transport is not None and not transport.is_closing():
            transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        chunks.clear()

    def discard(self) -> None:
        self._chunks.clear()
