"""The calls a session waits for: each in the compiled pending-call table by its random call id.

One timer, set for the earliest deadline, expires the calls nobody
answered. A call's replies come by the connection its invocation went by
(services reply through the nsqd an invocation came from), so when that
connection is lost its calls fail at once with ``ConnectionError``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from almanet._speedups.envelope import Reply
from almanet._speedups.pending import PendingCalls
from almanet.errors import CallTimeout, rpc_error
from almanet.nsq import Connection
from almanet.observer import Sending
from almanet.wire.errors import ConnectionFailed


class Call:
    """A call waiting for its reply: in the pending-call table, and told nsqd's answer to its invocation's publish."""

    __slots__ = ("future", "origin", "published", "sending", "timeout", "uri")

    def __init__(self, future: asyncio.Future[Any], uri: str, timeout: float) -> None:
        self.future = future
        self.uri = uri
        self.timeout = timeout
        # The connection the invocation went by, which its replies come by; None: any of the session's nsqd.
        self.origin: Connection | None = None
        self.published = False  # nsqd said OK to the invocation's publish
        self.sending: Sending | None = None  # the observer's, when there is one (almanet.observer)

    def reply(self, reply: Reply[Any]) -> bool:
        """Take ``reply``; True when the call is over."""
        future = self.future
        if not future.done():
            if reply.ok:
                future.set_result(reply)
            else:
                future.set_exception(rpc_error.from_reply_payload(reply.payload))
        return True

    def expire(self) -> None:
        if not self.future.done():
            self.future.set_exception(CallTimeout(self.unanswered(f"calling {self.uri}")))

    def unanswered(self, doing: str) -> str:
        """Why no reply came: the services did not answer, or nsqd did not even take the invocation."""
        if self.published:
            return f"no reply from {self.uri} within {self.timeout:g} s"
        nsqd = f"nsqd at {self.origin.address}" if self.origin is not None else "nsqd"
        return f"{nsqd} did not answer within {self.timeout:g} s: stopped, or overloaded? ({doing})"

    # What the call does with nsqd's answer to the publish of its invocation (almanet.nsq.connection.OnAnswer).

    def answered(self, answer: bytes) -> None:
        self.published = True  # nsqd has the invocation: now the reply is awaited

    def failed(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class Multicall(Call):
    """A call every channel of the procedure answers: replies gathered until the count or the timeout."""

    __slots__ = ("expected", "results")

    def __init__(self, future: asyncio.Future[Any], uri: str, timeout: float, expected: int | None) -> None:
        super().__init__(future, uri, timeout)
        self.expected = expected
        self.results: list[Reply[Any] | rpc_error] = []

    def reply(self, reply: Reply[Any]) -> bool:
        self.results.append(reply if reply.ok else rpc_error.from_reply_payload(reply.payload))
        if self.expected is not None and len(self.results) >= self.expected:
            self.expire()
            return True
        return False

    def expire(self) -> None:
        if not self.future.done():
            self.future.set_result(self.results)


class WaitingCalls:
    """The calls waiting for their replies (see the module); ``table`` finds one by call id."""

    def __init__(self) -> None:
        self.table: PendingCalls[Call] = PendingCalls()
        self.connection: Connection | None = None  # the connection calls go by now
        self._watched: set[Connection] = set()  # those calls went by, watched for their loss
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._expiry_at = 0.0

    def add(self, call: Call, deadline: float) -> int:
        """Wait for ``call`` until ``deadline`` (loop time); its call id."""
        call_id = self.table.add(call, deadline)
        if self._expiry_timer is None or deadline < self._expiry_at:
            self._expire_at(deadline)
        return call_id

    def watch(self, connection: Connection) -> None:
        """Calls went by ``connection`` (their ``origin``): they fail when it is lost."""
        if connection not in self._watched:
            self._watched.add(connection)
            connection.when_closed(self.lost)

    def lost(self, connection: Connection) -> None:
        """The calls published through ``connection`` fail: their replies would come by it, and cannot."""
        self._watched.discard(connection)
        if connection is self.connection:
            self.connection = None
        error = ConnectionFailed(f"the connection to nsqd at {connection.address} was lost before the reply came")
        table = self.table
        for call_id, call in table.items():
            if call.origin is connection:
                table.pop(call_id)
                call.failed(error)

    def fail_all(self, error: BaseException) -> None:
        """Fail every call waiting (the session leaves) and forget the connections they went by."""
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        for call in self.table.expire(float("inf")):
            call.failed(error)
        self.connection = None
        self._watched.clear()

    def _expire_at(self, deadline: float) -> None:
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
        self._expiry_at = deadline
        self._expiry_timer = asyncio.get_running_loop().call_at(deadline, self._expire)

    def _expire(self) -> None:
        # The loop may run a timer up to its clock resolution early: what was due then is due now.
        self._expiry_timer = None
        loop = asyncio.get_running_loop()
        for call in self.table.expire(max(loop.time(), self._expiry_at)):
            call.expire()
        next_deadline = self.table.next_deadline()
        if next_deadline is not None:
            self._expire_at(next_deadline)
