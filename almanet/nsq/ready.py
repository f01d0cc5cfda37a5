"""How a consumer shares its ``max_in_flight`` out as RDY across its connections, and backs off.

nsqd keeps sending to a connection while its in-flight count is below its
RDY, so answering a message makes room for the next one without another
RDY. ``max_in_flight`` is split evenly; below the number of connections, a
rotating few get RDY 1 (so that none is starved), or every connection with
``everywhere``. Backoff: after a message is requeued asking for it, every
connection gets RDY 0 for ``backoff_unit`` x 2^(n-1) seconds (n failures in
a row, capped by ``max_backoff``), then one connection gets RDY 1 to probe;
successes climb back out.
"""

from __future__ import annotations

import asyncio
import logging

from almanet.nsq.connection import Connection

logger = logging.getLogger("almanet.nsq")

# When max_in_flight is below the number of connections, the connections
# given RDY 1 change this often, so that none is starved; so does the
# connection given a backoff's probe.
RDY_ROTATION_INTERVAL = 5.0


class ReadyCounts:
    """The RDY of each of ``connections`` (a consumer's, by address), named ``name`` in logs (see the module)."""

    def __init__(
        self,
        name: str,
        connections: dict[str, Connection],
        max_in_flight: int,
        *,
        everywhere: bool,
        backoff: bool,
        backoff_unit: float,
        max_backoff: float,
    ) -> None:
        self._name = name
        self._connections = connections
        self._max_in_flight = max_in_flight
        self._everywhere = everywhere
        self._backoff = backoff
        self._backoff_unit = backoff_unit
        self._max_backoff = max_backoff
        self._backoff_level = 0
        self._backoff_timer: asyncio.TimerHandle | None = None
        self._probing = False
        self._rotation = 0
        self._rotation_timer: asyncio.TimerHandle | None = None
        self.stopping = False

    def stop(self) -> None:
        """RDY 0 on every connection, and no more from now on."""
        self.stopping = True
        for connection in self._connections.values():
            connection.set_ready(0)
        for timer in (self._backoff_timer, self._rotation_timer):
            if timer is not None:
                timer.cancel()

    def distribute(self) -> None:
        """Share max_in_flight out as RDY (nothing while stopping or backing off)."""
        if self.stopping or self._backoff_level:
            return
        connections = sorted(self._connections.values(), key=lambda connection: connection.address)
        count = len(connections)
        if not count:
            return
        share, extra = divmod(self._max_in_flight, count)
        if share == 0 and self._everywhere and self._max_in_flight:
            for connection in connections:
                connection.set_ready(1)
            return
        if share == 0:
            # Fewer RDY than connections: a rotating few get RDY 1.
            start = self._rotation % count
            chosen = {connections[(start + offset) % count] for offset in range(extra)}
            for connection in connections:
                connection.set_ready(1 if connection in chosen else 0)
            if self._rotation_timer is None and extra:
                self._rotation_timer = asyncio.get_running_loop().call_later(RDY_ROTATION_INTERVAL, self._rotate)
            return
        for index, connection in enumerate(connections):
            connection.set_ready(share + (index < extra))

    def _rotate(self) -> None:
        self._rotation_timer = None
        self._rotation += 1
        if self._probing:
            self._probe()
        else:
            self.distribute()

    def answered(self, requeued: bool, backoff: bool) -> None:
        """A message was answered: requeued (REQ), and asking to back off, or not (FIN)."""
        if self._backoff and not self.stopping and self._backoff_timer is None:
            if backoff:
                self._backoff_level += 1
                self._start_backoff()
            elif self._backoff_level and not requeued:
                self._backoff_level -= 1
                if self._backoff_level:
                    self._start_backoff()
                else:
                    logger.info("%s: backoff over", self._name)
                    self._probing = False
                    self.distribute()

    def _start_backoff(self) -> None:
        self._probing = False
        for connection in self._connections.values():
            connection.set_ready(0)
        duration = min(self._max_backoff, self._backoff_unit * 2 ** (self._backoff_level - 1))
        logger.info("%s: backing off for %.3g s", self._name, duration)
        self._backoff_timer = asyncio.get_running_loop().call_later(duration, self._probe)

    def _probe(self) -> None:
        """After a backoff, one message on one connection tells whether to go on.

        The probe's RDY 1 moves on to the next connection every rotation
        interval, as the one it is on may have no message to send.
        """
        self._backoff_timer = None
        if self.stopping:
            return
        self._probing = True
        connections = sorted(self._connections.values(), key=lambda connection: connection.address)
        if connections:
            probe = connections[self._rotation % len(connections)]
            for connection in connections:
                connection.set_ready(1 if connection is probe else 0)
        if self._rotation_timer is None:
            self._rotation_timer = asyncio.get_running_loop().call_later(RDY_ROTATION_INTERVAL, self._rotate)
