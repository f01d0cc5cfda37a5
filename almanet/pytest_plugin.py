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
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import IO, Any

import pytest

from almanet.broker import Broker

NSQD_NOT_FOUND = (
    "nsqd not found (ALMANET_NSQD, ALMANET_TEST_NSQD or PATH): broker tests run on the embedded broker only"
)


@dataclasses.dataclass(frozen=True)
class BrokerAddresses:
    tcp_address: str
    http_address: str
    embedded: bool  # False for nsqd


def find_nsqd() -> str | None:
    """The nsqd binary to start: ``ALMANET_NSQD``, else ``nsqd`` on ``PATH``; None when there is none."""
    named = os.environ.get("ALMANET_NSQD")
    if named:
        if not os.access(named, os.X_OK):
            raise pytest.UsageError(f"ALMANET_NSQD={named} is not an executable")
        return named
    return shutil.which("nsqd")


def brokers_available() -> list[str]:
    """``embedded``, and ``nsqd`` when one is running or can be started."""
    if os.environ.get("ALMANET_TEST_NSQD") or find_nsqd():
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
def nsqd_process(executable: str, *flags: str, startup_timeout: float = 10.0) -> Iterator[BrokerAddresses]:
    """nsqd started on free loopback ports with a temporary data path (and ``flags``); stopped on exit."""
    with tempfile.TemporaryDirectory(prefix="almanet-nsqd-") as data_path:
        process = subprocess.Popen(
            [executable, "-tcp-address=127.0.0.1:0", "-http-address=127.0.0.1:0", "-broadcast-address=127.0.0.1",
             f"-data-path={data_path}", *flags],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert process.stderr is not None
            tcp, http = _listening_addresses(process, process.stderr, startup_timeout)
            # Its log goes on being read, so that it never blocks writing it.
            threading.Thread(target=process.stderr.read, name="nsqd-log", daemon=True).start()
            yield BrokerAddresses(tcp, http, embedded=False)
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _listening_addresses(process: subprocess.Popen[str], log: IO[str], timeout: float) -> tuple[str, str]:
    """The TCP and HTTP addresses nsqd logs it listens on (``TCP: listening on 127.0.0.1:39693``)."""
    found: dict[str, str] = {}
    lines: list[str] = []
    timer = threading.Timer(timeout, process.kill)  # a read that never ends ends with the process
    timer.start()
    started = time.monotonic()
    try:
        for line in log:
            lines.append(line)
            for kind in ("TCP", "HTTP"):
                if f"{kind}: listening on " in line:
                    found[kind] = line.rsplit(" ", 1)[1].strip()
            if len(found) == 2:
                return found["TCP"], found["HTTP"]
    finally:
        timer.cancel()
    waited = time.monotonic() - started
    raise RuntimeError(f"nsqd did not start within {waited:.1f} s:\n{''.join(lines[-20:])}")


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
    with nsqd_process(executable) as addresses:
        yield addresses


@pytest.fixture(scope="session", params=brokers_available())
def almanet_broker(request: pytest.FixtureRequest) -> Iterator[BrokerAddresses]:
    """Addresses of a running broker: the embedded one, then nsqd when found (see the module docstring)."""
    with running_broker(request.param) as addresses:
        yield addresses


def pytest_report_header(config: pytest.Config) -> str:
    if "nsqd" in brokers_available():
        return f"almanet brokers: embedded, nsqd ({os.environ.get('ALMANET_TEST_NSQD') or find_nsqd()})"
    return "almanet brokers: embedded"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if "nsqd" not in brokers_available():
        terminalreporter.write_line(f"almanet: {NSQD_NOT_FOUND}", yellow=True)
