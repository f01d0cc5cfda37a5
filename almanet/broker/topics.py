"""Topics and channels of the embedded broker, with nsqd's delivery rules.

A topic gives a copy of each message to every channel, and keeps messages
published while it has no channel until one appears. A channel queues its
messages, defers those published with DPUB or requeued with a delay, and
hands them out round-robin to those of its subscribers whose RDY allows.
As in nsqd's ``channel.go``, the channel owns its in-flight messages, each
marked with the id of the subscriber it was sent to: FIN, REQ and TOUCH
succeed only for that subscriber, and a subscriber that leaves leaves its
messages in flight until their msg_timeout. Deferred messages and those
whose msg_timeout passed come back when the broker's queue scan finds them
(see ``queuescan``).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import operator
from collections import deque
from collections.abc import Callable
from typing import Protocol

from almanet.wire.errors import AlmanetError
from almanet.wire.protocol import EPHEMERAL_SUFFIX


class QueueFull(AlmanetError):
    """A publish would take a queue past mem-queue-size."""


class NotInFlight(AlmanetError):
    """FIN, REQ or TOUCH of a message the client does not hold in flight; the reason is nsqd's."""


class Consumer(Protocol):
    """A channel's subscriber, as the channel sees it (nsqd's ``Consumer``)."""

    @property
    def id(self) -> int: ...

    ready_count: int
    in_flight_count: int
    writing_paused: bool

    def deliver(self, message: Message, channel: Channel, now: float) -> bool:
        """Send ``message`` (the channel holds it in flight); whether the subscriber's RDY allows more."""
        ...

    def close(self) -> None: ...


class Message:
    """One channel's copy of a message; copies share id, body and timestamp."""

    __slots__ = ("attempts", "body", "client_id", "deadline", "delivered_at", "id", "timestamp")

    def __init__(self, message_id: bytes, body: bytes, timestamp: int) -> None:
        self.id = message_id
        self.body = body
        self.timestamp = timestamp
        self.attempts = 0
        self.delivered_at = 0.0  # loop time of the latest delivery
        self.deadline = 0.0  # loop time its msg_timeout expires, while in flight
        self.client_id = 0  # the subscriber holding it, while in flight


class Channel:
    """A named stream of a topic's messages, shared by its subscribers."""

    def __init__(self, topic: Topic, name: str) -> None:
        self.topic = topic
        self.name = name
        self.ephemeral = name.endswith(EPHEMERAL_SUFFIX.decode())
        self.deleted = False
        self.queue: deque[Message] = deque()
        self.clients: list[Consumer] = []  # subscribed, in the order they came
        self._clients_by_id: dict[int, Consumer] = {}
        # By id, in the order they were sent or touched: in deadline order,
        # except where a later one expires sooner (see _out_of_order).
        self.in_flight: dict[bytes, Message] = {}
        self._latest_deadline = -math.inf  # of those put in in_flight so far, at least
        # The earliest deadline of a message in in_flight after one expiring later:
        # until then, the messages due are at the front of in_flight.
        self._out_of_order = math.inf
        self.message_count = 0
        self.requeue_count = 0
        self.timeout_count = 0
        self._deferred: list[tuple[float, int, Message]] = []  # heap by due time
        self._deferred_seq = itertools.count()
        self._next_client = 0  # round-robin position

    @property
    def deferred_count(self) -> int:
        return len(self._deferred)

    @property
    def in_flight_count(self) -> int:
        return len(self.in_flight)

    def add_client(self, client: Consumer) -> None:
        self.clients.append(client)
        self._clients_by_id[client.id] = client

    def remove_client(self, client: Consumer) -> None:
        """A subscriber left; an ephemeral channel goes with its last one, as in nsqd.

        Its in-flight messages stay its own until FINed or timed out: nsqd
        gives them back only when their msg_timeout expires.
        """
        self.clients.remove(client)
        del self._clients_by_id[client.id]
        if not self.clients and self.ephemeral:
            self.topic.delete_channel(self.name)

    # --- in flight (nsqd's StartInFlightTimeout, FinishMessage, RequeueMessage, TouchMessage) ---

    def start_in_flight(self, message: Message, client_id: int, deadline: float) -> None:
        """``message`` was sent to client ``client_id``: in flight until FIN, REQ or ``deadline``."""
        message.client_id = client_id
        message.deadline = deadline
        self.in_flight[message.id] = message
        if deadline < self._latest_deadline:
            if deadline < self._out_of_order:
                self._out_of_order = deadline
        else:
            self._latest_deadline = deadline

    def _pop_in_flight(self, client_id: int, message_id: bytes) -> Message:
        in_flight = self.in_flight
        message = in_flight.get(message_id)
        if message is None or message.client_id != client_id:
            raise _not_in_flight(message)
        del in_flight[message_id]
        return message

    def finish(self, client_id: int, message_id: bytes) -> None:
        """FIN: the message is done with; ``NotInFlight`` unless client ``client_id`` holds it."""
        # The hot path of FIN: _pop_in_flight, inlined.
        in_flight = self.in_flight
        message = in_flight.get(message_id)
        if message is None or message.client_id != client_id:
            raise _not_in_flight(message)
        del in_flight[message_id]

    def requeue(self, client_id: int, message_id: bytes, delay: float) -> None:
        """REQ: the message goes back to the queue, now or after ``delay`` seconds; ``NotInFlight`` as ``finish``.

        The caller dispatches, once the client has counted the RDY slot freed.
        """
        message = self._pop_in_flight(client_id, message_id)
        self.requeue_count += 1
        if delay > 0:
            self._defer(message, delay)
        else:
            self.queue.append(message)

    def touch(self, client_id: int, message_id: bytes, msg_timeout: float, max_msg_timeout: float) -> None:
        """TOUCH: the message's msg_timeout starts again, up to ``max_msg_timeout`` after its delivery."""
        message = self._pop_in_flight(client_id, message_id)
        now = asyncio.get_running_loop().time()
        self.start_in_flight(message, client_id, min(now + msg_timeout, message.delivered_at + max_msg_timeout))

    def _take_timed_out(self, now: float) -> list[Message]:
        in_flight = self.in_flight
        if now >= self._out_of_order:
            # Look at them all, and find where they are out of order now.
            expired = []
            latest = -math.inf
            out_of_order = math.inf
            for message in in_flight.values():
                deadline = message.deadline
                if deadline <= now:
                    expired.append(message)
                elif deadline < latest:
                    out_of_order = min(out_of_order, deadline)
                else:
                    latest = deadline
            self._latest_deadline = latest
            self._out_of_order = out_of_order
            expired.sort(key=operator.attrgetter("deadline"))
        else:
            expired = []
            for message in in_flight.values():
                if message.deadline > now:
                    break
                expired.append(message)
        for message in expired:
            del in_flight[message.id]
        return expired

    def put(self, message: Message, delay: float) -> None:
        """A new message from the topic, to queue now or after ``delay`` seconds (DPUB)."""
        self.message_count += 1
        if delay > 0:
            self._defer(message, delay)
        elif not self.ephemeral or len(self.queue) < self.topic.mem_queue_size:
            self.queue.append(message)
        # else dropped: nsqd's ephemeral channels have no disk queue to overflow to

    def _defer(self, message: Message, delay: float) -> None:
        due = asyncio.get_running_loop().time() + delay
        heapq.heappush(self._deferred, (due, next(self._deferred_seq), message))

    def scan(self, now: float) -> bool:
        """Queue the messages whose msg_timeout or defer passed by ``now``; whether there were any.

        nsqd's queue scan of one channel: timed-out messages first, in
        deadline order, then the deferred ones due, to the queue's tail.
        """
        if self.deleted:
            return False
        queue = self.queue
        queued = len(queue)
        if self.in_flight:
            timed_out = self._take_timed_out(now)
            if timed_out:
                clients_by_id = self._clients_by_id
                for message in timed_out:
                    client = clients_by_id.get(message.client_id)
                    if client is not None:  # nsqd's TimedOutMessage
                        client.in_flight_count -= 1
                self.timeout_count += len(timed_out)
                queue.extend(timed_out)
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
            if client.ready_count > client.in_flight_count and not client.writing_paused
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
        self.in_flight.clear()
        self._latest_deadline = -math.inf
        self._out_of_order = math.inf
        for client in self.clients:
            client.in_flight_count = 0

    def delete(self) -> None:
        """Drop the messages, in flight too, and close the subscribers' connections, as nsqd does."""
        self.deleted = True
        self.empty()
        clients, self.clients = self.clients, []
        for client in clients:
            client.close()


def _not_in_flight(message: Message | None) -> NotInFlight:
    """nsqd's reason for refusing FIN, REQ or TOUCH of a message (``popInFlightMessage``)."""
    return NotInFlight("ID not in flight" if message is None else "client does not own message")


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
            if not channel.ephemeral and len(channel.queue) + count > self.mem_queue_size:
                raise QueueFull(f"mem-queue-size ({self.mem_queue_size}) reached for a channel of topic {self.name}")
        if not channels and not self.ephemeral and len(self.waiting) + count > self.mem_queue_size:
            raise QueueFull(f"mem-queue-size ({self.mem_queue_size}) reached for topic {self.name}")
        self.message_count += count
        self.message_bytes += len(bodies[0]) if count == 1 else sum(map(len, bodies))
        new_id = self._new_id
        if not channels:
            waiting = self.waiting
            for body in bodies:
                if len(waiting) < self.mem_queue_size or not self.ephemeral:
                    waiting.append((new_id(), body, timestamp, delay))
                # else dropped, as an ephemeral nsqd topic drops what its memory queue cannot hold
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
