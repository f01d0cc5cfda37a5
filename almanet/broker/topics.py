"""Topics and channels of the embedded broker, with nsqd's delivery rules.

A topic gives a copy of each message to every channel, and keeps messages
published while it has no channel until one appears. A channel queues its
messages, defers those published with DPUB or requeued with a delay, and
hands them out round-robin to those of its subscribers whose RDY allows.
In-flight messages belong to the subscriber they were sent to (see
``tcp.ClientConnection``); it gives them back on REQ. As in nsqd, deferred
messages and those whose msg_timeout passed come back when the broker's
queue scan finds them (see ``queuescan``).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import operator
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from almanet.wire.errors import AlmanetError
from almanet.wire.protocol import EPHEMERAL_SUFFIX

if TYPE_CHECKING:
    from almanet.broker.tcp import ClientConnection


class QueueFull(AlmanetError):
    """A publish would take a queue past mem-queue-size."""


class Message:
    """One channel's copy of a message; copies share id, body and timestamp."""

    __slots__ = ("attempts", "body", "deadline", "delivered_at", "id", "timestamp")

    def __init__(self, message_id: bytes, body: bytes, timestamp: int) -> None:
        self.id = message_id
        self.body = body
        self.timestamp = timestamp
        self.attempts = 0
        self.delivered_at = 0.0  # loop time of the latest delivery
        self.deadline = 0.0  # loop time its msg_timeout expires, while in flight


class Channel:
    """A named stream of a topic's messages, shared by its subscribers."""

    def __init__(self, topic: Topic, name: str) -> None:
        self.topic = topic
        self.name = name
        self.ephemeral = name.endswith(EPHEMERAL_SUFFIX.decode())
        self.deleted = False
        self.queue: deque[Message] = deque()
        self.clients: list[ClientConnection] = []  # subscribed, in the order they came
        self.departed: list[ClientConnection] = []  # gone, with messages still in flight
        self.in_flight_count = 0
        self.message_count = 0
        self.requeue_count = 0
        self.timeout_count = 0
        self._deferred: list[tuple[float, int, Message]] = []  # heap by due time
        self._deferred_seq = itertools.count()
        self._next_client = 0  # round-robin position

    @property
    def deferred_count(self) -> int:
        return len(self._deferred)

    def add_client(self, client: ClientConnection) -> None:
        self.clients.append(client)

    def remove_client(self, client: ClientConnection) -> None:
        """A subscriber left; an ephemeral channel goes with its last one, as in nsqd.

        Its in-flight messages stay its own until FINed or timed out: nsqd
        gives them back only when their msg_timeout expires.
        """
        self.clients.remove(client)
        if client.in_flight:
            self.departed.append(client)
        if not self.clients and self.ephemeral:
            self.topic.delete_channel(self.name)

    def owner_of(self, message_id: bytes) -> ClientConnection | None:
        """The client holding ``message_id`` in flight (the slow path of a failed FIN/REQ/TOUCH)."""
        for client in itertools.chain(self.clients, self.departed):
            if message_id in client.in_flight:
                return client
        return None

    def put(self, message: Message, delay: float) -> None:
        """A new message from the topic, to queue now or after ``delay`` seconds (DPUB)."""
        self.message_count += 1
        if delay > 0:
            self._defer(message, delay)
        else:
            self.queue.append(message)

    def _defer(self, message: Message, delay: float) -> None:
        due = asyncio.get_running_loop().time() + delay
        heapq.heappush(self._deferred, (due, next(self._deferred_seq), message))

    def requeue(self, message: Message, delay: float) -> None:
        """An in-flight message given back by REQ."""
        self.in_flight_count -= 1
        if self.deleted:
            return
        self.requeue_count += 1
        if delay > 0:
            self._defer(message, delay)
        else:
            self.queue.append(message)
        self.dispatch()

    def scan(self, now: float) -> bool:
        """Queue the messages whose msg_timeout or defer passed by ``now``; whether there were any.

        nsqd's queue scan of one channel: timed-out messages first, in
        deadline order, then the deferred ones due, to the queue's tail.
        """
        if self.deleted:
            return False
        queue = self.queue
        queued = len(queue)
        timed_out: list[Message] = []
        for client in itertools.chain(self.clients, self.departed):
            if client.in_flight:
                timed_out += client.take_timed_out(now)
        if timed_out:
            timed_out.sort(key=operator.attrgetter("deadline"))
            self.in_flight_count -= len(timed_out)
            self.timeout_count += len(timed_out)
            queue.extend(timed_out)
            self.departed = [client for client in self.departed if client.in_flight]
        deferred = self._deferred
        while deferred and deferred[0][0] <= now:
            queue.append(heapq.heappop(deferred)[2])
        if len(queue) == queued:
            return False
        self.dispatch()
        return True

    def dispatch(self) -> None:
        """Send queued messages to subscribers with RDY to spare, round-robin.

        Not to one that does not read what it is sent: nsqd, blocked writing
        to it, would give its messages to the others meanwhile.
        """
        queue = self.queue
        if not queue:
            return
        clients = self.clients
        count = len(clients)
        start = self._next_client % count if count else 0
        ready = [
            client
            for client in itertools.chain(clients[start:], clients[:start])
            if client.ready_count > len(client.in_flight) and not client.writing_paused
        ]
        if not ready:
            return
        loop_time = asyncio.get_running_loop().time()
        index = 0
        while queue:
            client = ready[index]
            if client.deliver(queue.popleft(), self, loop_time):
                index += 1
            else:
                del ready[index]
                if not ready:
                    break
            if index >= len(ready):
                index = 0
        self._next_client = clients.index(client) + 1

    def empty(self) -> None:
        """Drop every queued, deferred and in-flight message (nsqd's /channel/empty)."""
        self.queue.clear()
        self._deferred.clear()
        for client in itertools.chain(self.clients, self.departed):
            client.forget_in_flight()
        self.departed.clear()
        self.in_flight_count = 0

    def delete(self) -> None:
        """Drop the messages, in flight too, and close the subscribers' connections, as nsqd does."""
        self.deleted = True
        self.empty()
        clients, self.clients = self.clients, []
        for client in clients:
            client.close()


class Topic:
    """A named destination of publishes, copying each message to its channels."""

    def __init__(
        self, name: str, mem_queue_size: int, new_id: Callable[[], bytes], on_delete: Callable[[Topic], None]
    ) -> None:
        self.name = name
        self.ephemeral = name.endswith(EPHEMERAL_SUFFIX.decode())
        self.mem_queue_size = mem_queue_size
        self.channels: dict[str, Channel] = {}
        self.deleted = False
        # Messages published while there is no channel: (id, body, timestamp, defer seconds).
        self.waiting: deque[tuple[bytes, bytes, int, float]] = deque()
        self.message_count = 0
        self.message_bytes = 0
        self._new_id = new_id
        self._on_delete = on_delete

    def publish(self, bodies: list[bytes], timestamp: int, delay: float = 0.0) -> None:
        """Give each body to every channel, all or none; raises ``QueueFull``.

        The hot path of PUB and MPUB: plain loops, no generators.
        """
        channels = self.channels
        count = len(bodies)
        for channel in channels.values():
            if len(channel.queue) + count > self.mem_queue_size:
                raise QueueFull(f"mem-queue-size ({self.mem_queue_size}) reached for a channel of topic {self.name}")
        if not channels and len(self.waiting) + count > self.mem_queue_size:
            raise QueueFull(f"mem-queue-size ({self.mem_queue_size}) reached for topic {self.name}")
        self.message_count += count
        self.message_bytes += len(bodies[0]) if count == 1 else sum(map(len, bodies))
        new_id = self._new_id
        if not channels:
            waiting = self.waiting
            for body in bodies:
                waiting.append((new_id(), body, timestamp, delay))
            return
        for body in bodies:
            message_id = new_id()
            for channel in channels.values():
                channel.put(Message(message_id, body, timestamp), delay)
        if delay <= 0:
            for channel in channels.values():
                channel.dispatch()

    def get_channel(self, name: str) -> Channel:
        """The channel named ``name``, created if need be; the first one takes the waiting messages."""
        channel = self.channels.get(name)
        if channel is None:
            channel = self.channels[name] = Channel(self, name)
            if len(self.channels) == 1 and self.waiting:
                self._release_waiting(channel)
        return channel

    def _release_waiting(self, channel: Channel) -> None:
        waiting = self.waiting
        while waiting:
            message_id, body, timestamp, delay = waiting.popleft()
            channel.put(Message(message_id, body, timestamp), delay)

    def delete_channel(self, name: str) -> None:
        """Delete a channel; an ephemeral topic goes with its last one, as in nsqd."""
        channel = self.channels.pop(name)
        channel.delete()
        if not self.channels and self.ephemeral:
            self.delete()

    def empty(self) -> None:
        """Drop the messages waiting for a channel (nsqd's /topic/empty)."""
        self.waiting.clear()

    def delete(self) -> None:
        self.deleted = True
        for channel in list(self.channels.values()):
            channel.delete()
        self.channels.clear()
        self.waiting.clear()
        self._on_delete(self)
