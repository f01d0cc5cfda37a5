"""pytest plugin (entry point ``pytest11``): running NSQ brokers for tests.

The session-scoped fixture ``almanet_broker`` yields the ``tcp_address`` and
``http_address`` of a running broker, once per broker found, so a test that
takes it runs on each (its id ends in ``[embedded]`` or ``[nsqd]``):

- the embedded broker, on free loopback ports, in a thread of its own so
  that sync and async tests of any event loop can use it;
- nsqd, the production broker: the one named by ``ALMANET_TEST_NSQD=host:port``
  (with ``ALMANET_TEST_NSQD_HTTP=host:port``), else the ``nsqd`` binary named
  by ``ALMANET_NSQD`` or found on ``PATH``, started on free loopback ports
  with a temporary data path and stopped at the end. Where there is none,
  the run's header says so once and the tests run on the embedded broker.

Tests sharing a broker should use topic names of their own.

The fixture ``almanet_cluster`` yields a ``Cluster`` of its own for each
test: 3 nsqd registering with 2 nsqlookupd, on free loopback ports, from
the nsqd found as above and the nsqlookupd beside it (``ALMANET_NSQLOOKUPD``,
else beside nsqd, else on ``PATH``). Where either is missing, the test is
skipped, saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from almanet.broker import Broker
from almanet.broker.nsqd import Cluster, find_nsqd, find_nsqlookupd, nsqd_process

NSQD_NOT_FOUND = (
    "nsqd not found (ALMANET_NSQD, ALMANET_TEST_NSQD or PATH): broker tests run on the embedded broker only"
)


@dataclasses.dataclass(frozen=True)
class BrokerAddresses:
    tcp_address: str
    http_address: str
    embedded: bool  # False for nsqd


def brokers_available() -> list[str]:
    """``embedded``, and ``nsqd`` when one is running or can be started."""
    try:
        executable = find_nsqd()
    except RuntimeError as error:
        raise pytest.UsageError(str(error)) from None
    if os.environ.get("ALMANET_TEST_NSQD") or executable:
        return ["embedded", "nsqd"]
    return ["embedded"]


@contextlib.contextmanager
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


@contextlib.contextmanager
def running_broker(kind: str) -> Iterator[BrokerAddresses]:
    """The broker ``kind`` (``embedded`` or ``nsqd``) running, as ``almanet_broker`` yields it."""
    if kind == "embedded":
        with broker_in_thread(
            tcp_address="127.0.0.1:0", http_address="127.0.0.1:0", broadcast_address="127.0.0.1"
        ) as broker:
            yield BrokerAddresses(broker.tcp_address, broker.http_address, embedded=True)
        return
    external = os.environ.get("ALMANET_TEST_NSQD")
    if external:
        http = os.environ.get("ALMANET_TEST_NSQD_HTTP")
        if not http:
            raise pytest.UsageError("ALMANET_TEST_NSQD needs ALMANET_TEST_NSQD_HTTP (nsqd's HTTP host:port)")
        yield BrokerAddresses(external, http, embedded=False)
        return
    executable = find_nsqd()
    assert executable is not None
    with nsqd_process(executable) as (tcp, http):
        yield BrokerAddresses(tcp, http, embedded=False)


@pytest.fixture(scope="session", params=brokers_available())
def almanet_broker(request: pytest.FixtureRequest) -> Iterator[BrokerAddresses]:
    """Addresses of a running broker: the embedded one, then nsqd when found (see the module docstring)."""
    with running_broker(request.param) as addresses:
        yield addresses


@pytest.fixture
def almanet_cluster() -> Iterator[Cluster]:
    """A cluster of 3 nsqd and 2 nsqlookupd for this test, stopped after it (see the module docstring)."""
    nsqd, nsqlookupd = find_nsqd(), find_nsqlookupd()
    if nsqd is None or nsqlookupd is None:
        pytest.skip("no NSQ cluster: nsqd or nsqlookupd not found (ALMANET_NSQD, ALMANET_NSQLOOKUPD or PATH)")
    with Cluster(nsqd, nsqlookupd) as cluster:
        yield cluster


def pytest_report_header(config: pytest.Config) -> str:
    if "nsqd" in brokers_available():
        return f"almanet brokers: embedded, nsqd ({os.environ.get('ALMANET_TEST_NSQD') or find_nsqd()})"
    return "almanet brokers: embedded"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if "nsqd" not in brokers_available():
        terminalreporter.write_line(f"almanet: {NSQD_NOT_FOUND}", yellow=True)
