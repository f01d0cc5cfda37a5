"""nsqlookupd: which nsqd instances have a topic (``/lookup``), or are in the cluster at all (``/nodes``).

``NsqdWatch`` polls every nsqlookupd given and tells its listeners each
time the set of nsqd it lists changes. Each nsqd registers with every
nsqlookupd, so the union of the answers is the cluster: one nsqlookupd down
changes nothing, and when none answers the last known set stays.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote

from almanet.nsq import http
from almanet.wire.addresses import split_address
from almanet.wire.errors import ConnectionFailed

logger = logging.getLogger("almanet.nsq")

# How often a watch asks nsqlookupd, unless told otherwise: an nsqd that joins the cluster is
# served (and read) within about this long. nsqlookupd answers /nodes in well under a millisecond.
POLL_INTERVAL = 5.0
# How long one nsqlookupd gets to answer.
QUERY_TIMEOUT = 5.0


def http_host_port(address: str) -> tuple[str, int]:
    """``host:port`` or ``http://host:port`` → (host, port); ``ValueError`` saying how to write it."""
    host_port = address[len("http://") :] if address.startswith("http://") else address
    try:
        return split_address(host_port.rstrip("/"))
    except ValueError:
        raise ValueError(
            f"nsqlookupd address {address!r} is not http://host:port (with a port): write e.g. http://127.0.0.1:4161"
        ) from None


async def lookup(address: str, topic: str, timeout: float = QUERY_TIMEOUT) -> list[str]:
    """The TCP addresses (``host:port``) of the nsqd instances nsqlookupd lists for ``topic``.

    An unknown topic gives an empty list; an unreachable nsqlookupd or a bad
    answer raises ``ConnectionError``.
    """
    return await _producers(address, f"/lookup?topic={quote(topic)}", timeout)


async def nodes(address: str, timeout: float = QUERY_TIMEOUT) -> list[str]:
    """The TCP addresses (``host:port``) of every nsqd registered with nsqlookupd, as ``lookup``."""
    return await _producers(address, "/nodes", timeout)


async def _producers(address: str, path: str, timeout: float) -> list[str]:
    host, port = http_host_port(address)
    try:
        status, body = await http.request(host, port, path, timeout=timeout)
    except ConnectionFailed as error:
        raise ConnectionFailed(f"nsqlookupd at {address} {error}") from error
    if status == 404:
        return []  # TOPIC_NOT_FOUND: no nsqd has the topic yet
    try:
        if status != 200:
            raise ValueError(f"status {status}")
        producers = json.loads(body)["producers"]
        return [f"{producer['broadcast_address']}:{producer['tcp_port']}" for producer in producers]
    except (ValueError, KeyError, TypeError) as error:
        raise ConnectionFailed(f"nsqlookupd at {address} answered {path} badly: {error}") from error


def check_poll_interval(seconds: float) -> float:
    """``seconds`` if it can be the time between two polls, else ``ValueError``."""
    if not seconds > 0:
        raise ValueError(f"lookupd_poll_interval must be a positive number of seconds, not {seconds!r}")
    return seconds


class NsqdWatch:
    """The nsqd instances the nsqlookupd ``addresses`` list for ``topic`` (every nsqd when ``topic`` is None).

    ``start()`` asks once and returns with the answer; from then on it asks
    again every ``poll_interval`` seconds (with jitter, so that many clients do
    not ask in step) until ``stop()``, and tells each listener the new set
    whenever it changes. ``known`` is the union of the answers of the last
    poll any nsqlookupd answered.
    """

    def __init__(
        self, addresses: Sequence[str], poll_interval: float = POLL_INTERVAL, topic: str | None = None
    ) -> None:
        if not addresses:
            raise ValueError("a watch needs at least one nsqlookupd address (http://host:port)")
        for address in addresses:
            http_host_port(address)  # ValueError now, not at the first poll
        check_poll_interval(poll_interval)
        self.addresses = list(addresses)
        self.poll_interval = poll_interval
        self.topic = topic
        self.known: frozenset[str] = frozenset()
        self._listeners: list[Callable[[frozenset[str]], None]] = []
        self._started: asyncio.Future[None] | None = None
        self._polling: asyncio.Task[None] | None = None
        self._unanswered: set[str] = set()  # the nsqlookupd that did not answer the last poll

    def listen(self, listener: Callable[[frozenset[str]], None]) -> None:
        self._listeners.append(listener)

    def ignore(self, listener: Callable[[frozenset[str]], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    async def start(self) -> None:
        """Ask every nsqlookupd once (the first call), then keep polling in the background.

        Returns when the first poll is done, or was ended by ``stop()``.
        """
        if self._started is None:
            self._started = asyncio.ensure_future(self._poll())
            self._started.add_done_callback(self._poll_forever)
        first = self._started
        try:
            await asyncio.shield(first)
        except asyncio.CancelledError:
            if not first.cancelled():  # the caller is cancelled, not the poll
                raise

    def stop(self) -> None:
        if self._started is not None and not self._started.done():
            self._started.cancel()
        if self._polling is not None:
            self._polling.cancel()
        self._started = self._polling = None

    def _poll_forever(self, first: asyncio.Future[None]) -> None:
        if not first.cancelled() and self._started is first:
            self._polling = asyncio.ensure_future(self._poll_every_interval())

    async def _poll_every_interval(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval * random.uniform(0.9, 1.1))
            try:
                await self._poll()
            except Exception:  # a bug must not end the polling: nsqd that join would go unread
                logger.exception("asking nsqlookupd %s failed", ", ".join(self.addresses))

    async def _poll(self) -> None:
        topic = self.topic
        queries = (nodes(address) if topic is None else lookup(address, topic) for address in self.addresses)
        results: list[Any] = await asyncio.gather(*queries, return_exceptions=True)
        found: set[str] = set()
        answered = False
        for address, result in zip(self.addresses, results, strict=True):
            if isinstance(result, ConnectionError):
                if address not in self._unanswered:  # said once, not at every poll
                    self._unanswered.add(address)
                    logger.warning("%s; asking it again every %g s", result, self.poll_interval)
            elif isinstance(result, BaseException):
                raise result
            else:
                if address in self._unanswered:
                    self._unanswered.discard(address)
                    logger.info("nsqlookupd at %s answers again", address)
                answered = True
                found.update(result)
        if not answered or found == self.known:
            return  # none answered: the last known nsqd stay
        self.known = frozenset(found)
        for listener in list(self._listeners):
            self._tell(listener)

    def _tell(self, listener: Callable[[frozenset[str]], None]) -> None:
        try:
            listener(self.known)
        except Exception:  # one listener's bug must not keep the others from hearing
            logger.exception("a listener of nsqlookupd's answers failed")
