"""pytest plugin (entry point ``pytest11``): a running NSQ broker for tests.

The session-scoped fixture ``almanet_broker`` yields the ``tcp_address`` and
``http_address`` of an embedded broker on free loopback ports, run in a
thread of its own so that sync and async tests of any event loop can use it.
With ``ALMANET_TEST_NSQD=host:port`` and ``ALMANET_TEST_NSQD_HTTP=host:port``
set, it yields those instead: the same tests then run against a real nsqd.
Tests sharing the broker should use topic names of their own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from almanet.broker import Broker


@dataclasses.dataclass(frozen=True)
class BrokerAddresses:
    tcp_address: str
    http_address: str
    embedded: bool  # False for an external nsqd


@contextmanager
def broker_in_thread(**settings: Any) -> Iterator[Broker]:
    """A started ``Broker(**settings)`` whose event loop runs in a thread; stopped on exit."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="almanet-broker", daemon=True)
    thread.start()
    try:
        broker = Broker(**settings)
        asyncio.run_coroutine_threadsafe(broker.start(), loop).result()
        try:
            yield broker
        finally:
            asyncio.run_coroutine_threadsafe(broker.stop(), loop).result()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


@pytest.fixture(scope="session")
def almanet_broker() -> Iterator[BrokerAddresses]:
    """Addresses of a running broker: embedded, or the nsqd named by ``ALMANET_TEST_NSQD``."""
    external = os.environ.get("ALMANET_TEST_NSQD")
    if external:
        http = os.environ.get("ALMANET_TEST_NSQD_HTTP")
        if not http:
            raise pytest.UsageError("ALMANET_TEST_NSQD needs ALMANET_TEST_NSQD_HTTP (nsqd's HTTP host:port)")
        yield BrokerAddresses(external, http, embedded=False)
        return
    with broker_in_thread(
        tcp_address="127.0.0.1:0", http_address="127.0.0.1:0", broadcast_address="127.0.0.1"
    ) as broker:
        yield BrokerAddresses(broker.tcp_address, broker.http_address, embedded=True)
