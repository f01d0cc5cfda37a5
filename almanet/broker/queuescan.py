"""nsqd's queue scan: when timed-out and deferred messages come back.

nsqd has no timer per message (``queueScanLoop`` in ``nsqd.go``). Every
100 ms it looks at up to 20 channels, picked at random from a list of
channels it refreshes only every 5 s, and queues their messages whose
msg_timeout or defer has passed; while more than a quarter of the channels
it looked at had some, it picks again at once. So such a message comes back
up to 100 ms after it is due, and on a channel younger than the list up to
5 s after: clients see this timing, so the embedded broker keeps it.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from almanet.broker.topics import Channel

# nsqd's defaults (QueueScanInterval and the rest).
QUEUE_SCAN_INTERVAL = 0.1
QUEUE_SCAN_REFRESH_TICKS = 50  # the list of channels is refreshed every 5 s
QUEUE_SCAN_SELECTION_COUNT = 20
QUEUE_SCAN_DIRTY_PERCENT = 0.25


class QueueScan:
    """The broker's queue scan, from ``start()`` to ``stop()``."""

    def __init__(self, list_channels: Callable[[], list[Channel]]) -> None:
        self._list_channels = list_channels  # every channel of the broker's topics
        self._channels: list[Channel] = []
        self._start = 0.0
        self._tick_number = 0
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Tick from now, as nsqd's tickers from its start."""
        loop = asyncio.get_running_loop()
        self._start = loop.time()
        self._tick_number = 0
        self._channels = []
        self._timer = loop.call_at(self._start + QUEUE_SCAN_INTERVAL, self._tick, 1)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._channels = []

    def _tick(self, tick_number: int) -> None:
        loop = asyncio.get_running_loop()
        # Ticks the loop was too late for are dropped, as a Go ticker drops them.
        tick_number = max(tick_number, int((loop.time() - self._start) / QUEUE_SCAN_INTERVAL))
        if tick_number // QUEUE_SCAN_REFRESH_TICKS > self._tick_number // QUEUE_SCAN_REFRESH_TICKS:
            self._channels = self._list_channels()
        self._tick_number = tick_number
        self._timer = loop.call_at(self._start + (tick_number + 1) * QUEUE_SCAN_INTERVAL, self._tick, tick_number + 1)
        channels = self._channels
        count = min(QUEUE_SCAN_SELECTION_COUNT, len(channels))
        while count:
            selected = channels if count == len(channels) else random.sample(channels, count)
            now = loop.time()
            dirty = sum(channel.scan(now) for channel in selected)
            if dirty / count <= QUEUE_SCAN_DIRTY_PERCENT:
                return
