"""Deleting the topics that clients left behind on nsqd: named with a prefix, read by no channel.

nsqd deletes an ephemeral topic once its last channel goes, but a publish to
it afterwards creates it again, with no channel, and nsqd keeps it and what
was published to it until it restarts. An RPC caller that dies with calls in
flight leaves its reply topic so: the late replies create it again, as do
replies to reply topics an invocation made up.

``TopicSweeper.sweep`` asks nsqd's HTTP API for its topics and deletes those
named with the prefix that had no channel at the sweep before too: swept
every ``SWEEP_INTERVAL`` seconds, such a topic is gone within two intervals,
and a reader that reconnects meanwhile keeps its topic. nsqd's HTTP API is
looked for at its TCP port + 1 (4151 beside 4150, as nsqd listens by
default) and checked by its ``/info``; where it is not there, that nsqd is
not swept, as logged once.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterable
from urllib.parse import quote

from almanet.nsq import http
from almanet.wire.addresses import split_address
from almanet.wire.errors import ConnectionFailed

logger = logging.getLogger("almanet.nsq")

SWEEP_INTERVAL = 20.0
# How long one request to nsqd's HTTP API may take.
REQUEST_TIMEOUT = 5.0


class TopicSweeper:
    """Deletes the topics named ``prefix...`` that no channel read at two sweeps in a row (see the module)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._channelless: dict[str, set[str]] = {}  # nsqd TCP address -> its prefixed topics with no channel
        self._apis: dict[str, tuple[str, int] | None] = {}  # nsqd TCP address -> its HTTP API; None: not there
        self._said: set[str] = set()  # the nsqd whose HTTP API was not found, said once

    async def run(self, nsqd_addresses: Callable[[], Iterable[str]]) -> None:
        """Sweep the nsqd ``nsqd_addresses()`` gives every ``SWEEP_INTERVAL`` seconds, until cancelled."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                await self.sweep(nsqd_addresses())
            except Exception:  # a bug: said, and the next sweep goes on
                logger.exception("sweeping the topics left behind failed")

    async def sweep(self, nsqd_addresses: Iterable[str]) -> list[str]:
        """Sweep each nsqd (given by TCP address); the topics deleted."""
        deleted = []
        for address in nsqd_addresses:
            deleted += await self._sweep(address)
        return deleted

    async def _sweep(self, address: str) -> list[str]:
        try:
            return await self._sweep_api(address)
        except ConnectionFailed as error:
            logger.debug("not sweeping nsqd at %s this time: its HTTP API %s", address, error)
            return []

    async def _sweep_api(self, address: str) -> list[str]:
        api = await self._api(address)
        if api is None:
            return []
        host, port = api
        status, body = await http.request(
            host, port, "/stats?format=json&include_clients=false&include_mem=false", timeout=REQUEST_TIMEOUT
        )
        try:
            if status != 200:
                raise ValueError(f"status {status}")
            topics = json.loads(body)["topics"]
            channelless = {
                topic["topic_name"]
                for topic in topics
                if topic["topic_name"].startswith(self.prefix) and not topic["channels"]
            }
        except (ValueError, KeyError, TypeError) as error:
            raise ConnectionFailed(f"answered /stats badly: {error}") from error
        deleted = []
        for name in sorted(channelless & self._channelless.get(address, set())):
            status, _ = await http.request(
                host, port, f"/topic/delete?topic={quote(name)}", method="POST", timeout=REQUEST_TIMEOUT
            )
            if status == 200:  # 404: deleted meanwhile (by another sweeper, or its last reader)
                deleted.append(name)
                channelless.discard(name)
        self._channelless[address] = channelless
        if deleted:
            logger.info("nsqd at %s: deleted %d topics no one reads: %s", address, len(deleted), ", ".join(deleted))
        return deleted

    async def _api(self, address: str) -> tuple[str, int] | None:
        """nsqd's HTTP API beside its TCP ``address``, once it answered /info with that TCP port; None if not."""
        if address in self._apis:
            return self._apis[address]
        host, tcp_port = split_address(address)
        api = host, tcp_port + 1
        try:
            status, body = await http.request(*api, "/info", timeout=REQUEST_TIMEOUT)
            found = status == 200 and json.loads(body).get("tcp_port") == tcp_port
        except ConnectionFailed:  # nsqd restarting, say: asked again at the next sweep
            found = None
        except (ValueError, AttributeError):
            found = False
        if not found and address not in self._said:  # not there, or not yet: asked again unless not there
            self._said.add(address)
            logger.info(
                "nsqd at %s: its HTTP API does not answer at %s:%d (its TCP port + 1): topics that callers "
                "left behind there are not deleted (docs/NSQD.md, 'Reply topics left behind')",
                address,
                *api,
            )
        if found is None:
            return None
        self._apis[address] = api if found else None
        return self._apis[address]
