"""Which URIs are served: what a session asks before it calls a URI not known to be served.

A discovery query (an invocation whose payload is the URI) goes to
``almanet.rpc.DISCOVERY_TOPIC``, where every running service has a channel
of its own, and the services serving the URI reply. Concurrent calls to one
URI share one query; a URI stays known served for ``SERVED_FOR`` seconds
after a service said so or a reply came from it. No reply: ``NoResponders``,
unless nsqlookupd lists the URI's topic on other nsqd only (an nsqd that
joined, which the services reach within their poll), when it asks again for
up to two polls. A query gathers every answer within ``DISCOVERY_WAIT``: when
all said they take batches, invocations to the URI go in batches
(``almanet.rpc.BATCH_ITEMS``) until a query finds one that does not;
``BATCHES_CHECKED_EVERY`` seconds on, it is asked again.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from almanet._speedups.envelope import Reply
from almanet.calls import Call
from almanet.errors import CallTimeout, NoResponders
from almanet.nsq import Connection
from almanet.nsq.lookupd import lookup
from almanet.rpc import DISCOVERY_TOPIC, DISCOVERY_WAIT, SERVED_FOR, takes_batches

SERVED_KEPT = 4096  # URIs known served, past which those no longer known are forgotten
# After a wait in vain for the services of a URI listed on other nsqd (a topic left over), calls to it fail at
# once for this long.
NOT_WAITED_FOR_AGAIN = 60.0
# How often the services of a URI whose invocations go in batches are asked again whether they all take them.
BATCHES_CHECKED_EVERY = 10.0


class Query(Protocol):
    """A discovery query no service answered."""

    published: bool  # nsqd took it
    origin: Connection | None  # the connection it went by; None: any of the session's nsqd

    def unanswered(self, doing: str) -> str: ...


class DiscoveryQuery(Call):
    """A query for ``uri``: over at the first answer, and gathering the others until its wait ends.

    Then it tells ``discovery`` whether every service that answered takes
    batches of invocations (one that does not would drop them).
    """

    __slots__ = ("all_take_batches", "asked", "discovery")

    def __init__(self, future: asyncio.Future[Any], uri: str, discovery: Discovery) -> None:
        super().__init__(future, DISCOVERY_TOPIC, DISCOVERY_WAIT)
        self.asked = uri
        self.discovery = discovery
        self.all_take_batches = True

    def reply(self, reply: Reply[Any]) -> bool:
        self.all_take_batches &= takes_batches(reply.payload)
        super().reply(reply)
        return False  # in the table until the wait ends, for the answers of the other services

    def expire(self) -> None:
        self.discovery.answered(self.asked, self.future.done() and self.all_take_batches)
        super().expire()

    def failed(self, error: BaseException) -> None:
        self.discovery.answered(self.asked, False)  # not asked, or its connection lost: no batches, to be safe
        super().failed(error)


class Addresses(Protocol):
    """Where the session asks: its nsqd, and its nsqlookupd polled every ``lookupd_poll_interval`` seconds."""

    nsqd_addresses: list[str]
    lookupd_addresses: list[str]
    lookupd_poll_interval: float


class Discovery:
    """The URIs known served, and the queries asking about the others.

    ``ask(uri)`` publishes one query and returns None once a service answered
    it, or the query when none did within ``DISCOVERY_WAIT``.
    """

    def __init__(self, ask: Callable[[str], Awaitable[Query | None]], addresses: Addresses) -> None:
        self._ask = ask
        self._addresses = addresses
        self.served_until: dict[str, float] = {}  # URI -> loop time until which it is known served
        self.batches: set[str] = set()  # URIs whose invocations go in batches (see DiscoveryQuery)
        self._checks: dict[str, asyncio.TimerHandle] = {}  # URI -> when the batches to it are checked again
        self._asking: dict[str, asyncio.Future[None]] = {}  # URI -> its query, shared
        self._not_coming: dict[str, float] = {}  # URI -> loop time until which no service is waited for

    def answered(self, uri: str, all_take_batches: bool) -> None:
        """A query's wait for ``uri`` ended: the services that answered all take batches, or not (or none answered).

        While they do and calls go to ``uri``, they are asked again every
        ``BATCHES_CHECKED_EVERY`` seconds (calls go on in batches meanwhile):
        an instance of an almanet that takes no batches may have joined them
        (a rollback), and would drop them.
        """
        if not all_take_batches:
            self.batches.discard(uri)
            return
        self.batches.add(uri)
        if uri not in self._checks:
            self._checks[uri] = asyncio.get_running_loop().call_later(BATCHES_CHECKED_EVERY, self._check_batches, uri)

    def _check_batches(self, uri: str) -> None:
        del self._checks[uri]
        if self.served_until.get(uri, 0.0) < asyncio.get_running_loop().time():
            self.batches.discard(uri)  # not called lately: its next call asks anyway
        elif uri in self.batches:  # else found not to take them meanwhile
            asked = asyncio.ensure_future(self._ask(uri))
            asked.add_done_callback(functools.partial(self._checked, uri))  # the query's end tells ``answered``

    def _checked(self, uri: str, asked: asyncio.Future[Query | None]) -> None:
        if asked.cancelled() or asked.exception() is not None:  # could not be asked (the session left, say)
            self.batches.discard(uri)  # to be safe: the next query after SERVED_FOR tells again

    def clear(self) -> None:
        """Forget what is known: the services may be gone when the session joins again."""
        self.served_until.clear()
        self.batches.clear()
        for check in self._checks.values():
            check.cancel()
        self._checks.clear()
        self._not_coming.clear()

    async def wait_served(self, uri: str, timeout: float) -> None:
        """Return once a service said it serves ``uri``; ``NoResponders`` when none did."""
        query = self._asking.get(uri)
        if query is None:
            query = self._asking[uri] = asyncio.ensure_future(self._ask_who_serves(uri))
            query.add_done_callback(functools.partial(self._asked, uri))
        # Not cancelled by this call's timeout or cancellation: other calls may wait for it.
        await asyncio.wait((query,), timeout=timeout)
        if not query.done():
            raise CallTimeout(f"no reply from {uri} within {timeout:g} s")
        query.result()

    async def _ask_who_serves(self, uri: str) -> None:
        """Ask until a service answers; ``NoResponders`` once none did and none is on its way."""
        loop = asyncio.get_running_loop()
        addresses = self._addresses
        learning_until = None
        while True:
            unanswered = await self._ask(uri)
            if unanswered is None:
                return
            if not unanswered.published:  # nsqd, not the services, did not answer: say so, not NoResponders
                raise CallTimeout(unanswered.unanswered(f"asking who serves {uri}"))
            asked = unanswered.origin.address if unanswered.origin is not None else addresses.nsqd_addresses[0]
            if self._not_coming.get(uri, 0.0) > loop.time():
                elsewhere = []  # waited for lately, in vain
            else:
                elsewhere = await self._listed_elsewhere(uri, asked)
            if learning_until is None:
                learning_until = loop.time() + 2 * addresses.lookupd_poll_interval
            if not elsewhere:
                raise NoResponders(f"nothing serves {uri}: no service answered within {DISCOVERY_WAIT:g} s")
            if loop.time() >= learning_until:
                # Its topic is left over from services gone (nsqd keeps topics): not waited for again for a while.
                self._not_coming[uri] = loop.time() + NOT_WAITED_FOR_AGAIN
                raise NoResponders(
                    f"nothing serves {uri} on nsqd at {asked}: nsqlookupd lists its topic on {', '.join(elsewhere)}, "
                    f"but no service there came to this nsqd within {2 * addresses.lookupd_poll_interval:g} s"
                )

    async def _listed_elsewhere(self, uri: str, asked: str) -> list[str]:
        """The nsqd that nsqlookupd lists with ``uri``'s topic when the nsqd ``asked`` is not one of them.

        A service creates its procedures' topics on every nsqd of the
        cluster: a topic on others and not on ``asked`` means an nsqd that
        joined, which its services reach within their nsqlookupd poll, so
        the query is asked again meanwhile. Without nsqlookupd: none.
        """
        lookupd = self._addresses.lookupd_addresses
        if not lookupd:
            return []
        answers = await asyncio.gather(*(lookup(address, uri) for address in lookupd), return_exceptions=True)
        listed = {nsqd for answer in answers if not isinstance(answer, BaseException) for nsqd in answer}
        return [] if asked in listed else sorted(listed)

    def _asked(self, uri: str, query: asyncio.Future[None]) -> None:
        del self._asking[uri]
        if not query.cancelled() and query.exception() is None:
            served_until, now = self.served_until, asyncio.get_running_loop().time()
            if len(served_until) >= SERVED_KEPT:  # URIs called once (orders.<id>.get) are not kept forever
                for known in [known for known, until in served_until.items() if until < now]:
                    del served_until[known]
                    self.batches.discard(known)
            served_until[uri] = now + SERVED_FOR
