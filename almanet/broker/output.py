"""When a client of the embedded broker gets what is sent to it: nsqd's output buffering.

nsqd (``client_v2.go``, ``protocol_v2.go``) writes to each client through a
``bufio.Writer`` of the client's ``output_buffer_size``:

- A response, an error or a heartbeat is written and the buffer flushed at
  once (nsqd's ``Send``).
- A message frame only goes into the buffer, which writes out what does not
  fit (``bufio`` semantics). The client's message pump flushes it when the
  client is ready for no more messages (RDY used up or lowered), and
  otherwise on a tick of its ``output_buffer_timeout`` ticker.

The ticker runs from when the client's protocol magic arrives (restarted by
IDENTIFY), and like a Go ticker keeps one tick that comes while nobody waits
for it. The pump waits for it only while it holds messages it has not
flushed, so the first message after a quiet spell goes out at once, on the
tick that came meanwhile, and the next ones wait for the following tick.

Bytes nsqd would have written out reach the transport in one write at the
end of the event-loop iteration; on a compressed connection (snappy, deflate)
through the compressor, which flushes what it is given, as nsqd flushes its
compressing writer with its buffer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

# Bytes nsqd writes for a frame before its data, as a write of their own: size and type.
_FRAME_HEADER_SIZE = 8


class ClientOutput:
    """nsqd's output buffer to one client, and the message pump's flushes of it."""

    __slots__ = (
        "_buffered",
        "_loop",
        "_pumping",
        "_stale_tick",
        "_tick_handle",
        "_ticker_start",
        "_ticks_seen",
        "_transport",
        "_unwritten",
        "_write_out",
        "_write_scheduled",
        "flush_interval",
        "size",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int, flush_interval: float) -> None:
        self._loop = loop
        self._transport: asyncio.WriteTransport | None = None
        self._write_out: Callable[[bytes], None] = _nowhere  # the transport's write, through the compressor if any
        self._unwritten: list[bytes] = []  # frames not handed to the transport yet, in order
        self._buffered = 0  # the trailing bytes of those still in nsqd's buffer: the client cannot have them yet
        self._write_scheduled = False
        self.size = size
        # The pump: whether it holds messages it has not flushed (nsqd's ``flushed`` is false).
        self._pumping = False
        # Its ticker, counted in ticks since it started: those up to _ticks_seen came
        # while the pump waited for them, or before it last did.
        self.flush_interval = flush_interval  # output_buffer_timeout; 0 for none
        self._ticker_start = loop.time()
        self._ticks_seen = 0
        self._stale_tick = False  # a tick left in a ticker IDENTIFY stopped
        self._tick_handle: asyncio.TimerHandle | None = None

    def attach(self, transport: asyncio.WriteTransport, compress: Callable[[bytes], bytes] | None = None) -> None:
        """Write to ``transport`` from now on, through ``compress`` if given (chosen once: no test per write)."""
        self._transport = transport
        if compress is None:
            self._write_out = transport.write
        else:

            def write_compressed(data: bytes) -> None:
                transport.write(compress(data))

            self._write_out = write_compressed
        if self._unwritten:
            self._schedule_write()

    def detach(self) -> None:
        """Write nothing until ``attach`` (a TLS handshake is under way): what is sent meanwhile waits."""
        self._transport = None
        self._write_out = _nowhere

    def write_now(self) -> None:
        """Write out at once what the client may have (before its connection is upgraded)."""
        self._write()

    def restart_ticker(self, flush_interval: float) -> None:
        """IDENTIFY's new ticker; without one, Go keeps a tick the old one left unread."""
        now = self._loop.time()
        self._stale_tick = not flush_interval and self._tick_missed(now)
        self.flush_interval = flush_interval
        self._ticker_start = now
        self._ticks_seen = 0

    def send(self, frame: bytes) -> None:
        """A response, error or heartbeat: written, then all that is buffered flushed."""
        self._unwritten.append(frame)
        self._buffered = 0
        self._schedule_write()

    def send_message(self, frame: bytes, ready_for_more: bool) -> None:
        """A message frame, into the buffer; a client ready for no more gets it at once.

        The hot path of delivery: what is written out is written in ``_overflow``, ``flush``
        and ``_start_pumping``.
        """
        self._unwritten.append(frame)
        buffered = self._buffered + len(frame)
        self._buffered = buffered if buffered <= self.size else self._overflow(len(frame))
        if not ready_for_more:
            self.flush()
        elif not self._pumping:
            self._start_pumping()

    def flush(self) -> None:
        """The pump's flush: the client is ready for no more messages, or a tick came."""
        if self._pumping:
            self._pumping = False
            self._see_ticks(self._loop.time())
            self._cancel_tick()
        if self._buffered:
            self._buffered = 0
            self._schedule_write()

    def close(self) -> None:
        """Write out what nsqd would have written before closing; it drops what its buffer holds."""
        data = b"".join(self._unwritten)
        visible = len(data) - self._buffered
        transport = self._transport
        if visible and transport is not None and not transport.is_closing():
            self._write_out(data[:visible])
        self.discard()

    def discard(self) -> None:
        self._cancel_tick()
        self._unwritten.clear()
        self._buffered = 0

    def _overflow(self, frame_size: int) -> int:
        """How many bytes bufio holds after a frame that does not fit.

        It fills the buffer and writes it out, and writes a part larger than
        the buffer straight through when it holds nothing.
        """
        size = self.size
        buffered = self._buffered
        for part in (_FRAME_HEADER_SIZE, frame_size - _FRAME_HEADER_SIZE):
            while part > size - buffered:
                if not buffered:
                    part = 0
                    break
                part -= size - buffered
                buffered = 0
            buffered += part
        self._schedule_write()
        return buffered

    def _start_pumping(self) -> None:
        now = self._loop.time()
        if self._tick_missed(now):
            # The tick waiting in the ticker flushes this first message at once.
            self._stale_tick = False
            self._see_ticks(now)
            self._buffered = 0
            self._schedule_write()
            return
        self._pumping = True
        interval = self.flush_interval
        if interval:
            next_tick = max(self._ticks_by(now), self._ticks_seen) + 1
            self._tick_handle = self._loop.call_at(self._ticker_start + next_tick * interval, self._tick, next_tick)

    def _ticks_by(self, now: float) -> int:
        """How many ticks the ticker has made by ``now``."""
        return int((now - self._ticker_start) // self.flush_interval)

    def _see_ticks(self, now: float) -> None:
        if self.flush_interval:
            self._ticks_seen = max(self._ticks_seen, self._ticks_by(now))

    def _tick_missed(self, now: float) -> bool:
        """Whether a tick came since the pump last waited for one (Go's ticker keeps one)."""
        if self._stale_tick:
            return True
        return bool(self.flush_interval) and self._ticks_by(now) > self._ticks_seen

    def _tick(self, tick_number: int) -> None:
        self._tick_handle = None
        self.flush()
        self._ticks_seen = max(self._ticks_seen, tick_number)

    def _cancel_tick(self) -> None:
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None

    def _schedule_write(self) -> None:
        if not self._write_scheduled:
            self._write_scheduled = True
            self._loop.call_soon(self._write)

    def _write(self) -> None:
        self._write_scheduled = False
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        chunks = self._unwritten
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        buffered = self._buffered
        if not buffered:
            if data:
                self._write_out(data)
            chunks.clear()
        elif len(data) > buffered:
            self._write_out(data[:-buffered])
            self._unwritten = [data[-buffered:]]


def _nowhere(data: bytes) -> None:
    raise AssertionError("no transport to write to")
