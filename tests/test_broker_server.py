"""The embedded broker itself: its Python API, its options, its command line and its pytest plugin."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest
from rawnsq import RawConnection

from almanet._speedups.frames import (
    ErrorFrame,
    ResponseFrame,
    encode_dpub,
    encode_fin,
    encode_mpub,
    encode_pub,
    encode_rdy,
    encode_req,
    encode_touch,
)
from almanet.broker import Broker, queuescan
from almanet.broker.client import Client
from almanet.broker.options import parse_duration
from almanet.broker.output import ClientOutput
from almanet.broker.queuescan import QueueScan
from almanet.broker.topics import Channel
from almanet.pytest_plugin import brokers_available
from almanet.wire.protocol import OK

LOOPBACK = {"tcp_address": "127.0.0.1:0", "http_address": "127.0.0.1:0"}


@pytest.fixture
async def start_broker() -> AsyncIterator[Any]:
    """Starts brokers with given settings on free loopback ports; stops them after the test."""
    brokers: list[Broker] = []

    async def start(**settings: Any) -> Broker:
        broker = Broker(**LOOPBACK, **settings)
        await broker.start()
        brokers.append(broker)
        return broker

    yield start
    for broker in brokers:
        await broker.stop()


async def test_async_with_binds_free_ports_and_reports_them() -> None:
    async with Broker(**LOOPBACK) as broker:
        assert broker.tcp_address == f"127.0.0.1:{broker.tcp_port}" and broker.tcp_port > 0
        assert broker.http_port > 0 and broker.http_port != broker.tcp_port
        connection = await RawConnection.open(broker.tcp_address)
        connection.send(encode_pub("t", b"x"))
        assert await connection.frame() == ResponseFrame(OK)
        with pytest.raises(RuntimeError, match="already started"):
            await broker.start()
    await connection.closed()  # stopping closes every connection
    with pytest.raises(OSError):
        await RawConnection.open(broker.tcp_address)


async def test_a_stopped_broker_can_start_again_on_the_same_port() -> None:
    broker = Broker(**LOOPBACK)
    await broker.start()
    address = broker.tcp_address
    await broker.stop()
    again = Broker(tcp_address=address, http_address="127.0.0.1:0")
    async with again:
        assert again.tcp_address == address


async def test_a_port_in_use_is_reported(start_broker: Any) -> None:
    running = await start_broker()
    with pytest.raises(OSError):
        await Broker(tcp_address=running.tcp_address, http_address="127.0.0.1:0").start()


async def fill_the_socket_buffers(broker: Broker) -> RawConnection:
    """A consumer of topic "t" that does not read, and more messages than the socket buffers hold."""
    stuck = await RawConnection.consumer(broker.tcp_address, "t", "c", rdy=2500)
    publisher = await RawConnection.open(broker.tcp_address)
    for _ in range(4):
        publisher.send(encode_mpub("t", [b"x" * 100_000] * 40))
    for _ in range(4):
        assert await publisher.frame() == ResponseFrame(OK)
    return stuck


async def test_stop_closes_even_connections_whose_clients_do_not_read() -> None:
    broker = Broker(**LOOPBACK)
    await broker.start()
    stuck = await fill_the_socket_buffers(broker)
    host, _, port = broker.http_address.rpartition(":")
    _, http_writer = await asyncio.open_connection(host, int(port))
    with contextlib.suppress(asyncio.TimeoutError):  # not TimeoutError before Python 3.11
        for _ in range(1000):  # until the broker reads no more: its replies fill the socket buffers
            http_writer.write(b"GET /stats?format=json HTTP/1.1\r\nHost: x\r\n\r\n" * 1000)
            await asyncio.wait_for(http_writer.drain(), 0.5)
    await asyncio.wait_for(broker.stop(), 5)
    await asyncio.sleep(0.1)
    assert not broker.clients
    assert not broker._http_connections  # no public view of them
    await stuck.close()
    http_writer.close()


@pytest.fixture
def prompt_queue_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    """The queue scan refreshes its list of channels every 100 ms, not 5 s (as nsqd's own tests set it)."""
    monkeypatch.setattr(queuescan, "QUEUE_SCAN_REFRESH_TICKS", 1)


def record_timers(monkeypatch: pytest.MonkeyPatch, *owners: type) -> list[asyncio.TimerHandle]:
    """The timers objects of the ``owners`` classes schedule from now on (call_later goes through call_at)."""
    loop = asyncio.get_running_loop()
    timers: list[asyncio.TimerHandle] = []
    call_at = loop.call_at

    def recording_call_at(when: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        timer = call_at(when, callback, *args, **kwargs)
        if isinstance(getattr(callback, "__self__", None), owners):
            timers.append(timer)
        return timer

    monkeypatch.setattr(loop, "call_at", recording_call_at)
    return timers


async def test_stop_leaves_no_timer_running(monkeypatch: pytest.MonkeyPatch) -> None:
    timers = record_timers(monkeypatch, Client, ClientOutput, Channel, QueueScan)
    broker = Broker(**LOOPBACK)
    await broker.start()
    holder = await RawConnection.consumer(broker.tcp_address, "t", "c", rdy=2)  # keeps its output buffered
    departing = await RawConnection.consumer(broker.tcp_address, "t", "c")
    publisher = await RawConnection.open(broker.tcp_address)
    publisher.send(encode_pub("t", b"1") + encode_pub("t", b"2") + encode_dpub("t", 60_000, b"later"))
    await holder.message()
    await departing.message()
    await departing.close()  # leaves its message in flight
    await broker.stop()
    await asyncio.sleep(0.1)
    loop = asyncio.get_running_loop()
    assert [timer for timer in timers if not timer.cancelled() and timer.when() > loop.time()] == []
    for connection in (holder, publisher):
        await connection.close()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"mem_queue_size": 0}, "mem_queue_size must be at least 1"),
        ({"max_msg_size": 10, "max_body_size": 5}, "max_msg_size must not exceed max_body_size"),
        ({"msg_timeout": 0}, "msg_timeout must be positive"),
        ({"msg_timeout": 100.0, "max_msg_timeout": 10.0}, "msg_timeout must not exceed max_msg_timeout"),
        ({"output_buffer_timeout": 0}, "output_buffer_timeout must be positive"),
        ({"tcp_address": "localhost"}, "'localhost' has no port: write host:port, e.g. 127.0.0.1:4150"),
    ],
)
def test_invalid_options_are_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Broker(**settings)


@pytest.mark.parametrize(
    ("text", "seconds"), [("0", 0.0), ("250ms", 0.25), ("60s", 60.0), ("1m30s", 90.0), ("1h", 3600.0), ("1.5s", 1.5)]
)
def test_durations_are_read_as_go_writes_them(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "60", "s", "1x", "1s2"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


# --- options that change protocol behaviour --------------------------------------


async def test_mem_queue_size_refuses_publishes_instead_of_dropping(start_broker: Any) -> None:
    broker = await start_broker(mem_queue_size=3)
    connection = await RawConnection.open(broker.tcp_address)
    connection.send(encode_mpub("t", [b"1", b"2"]) + encode_mpub("t", [b"3", b"4"]))
    assert await connection.frame() == ResponseFrame(OK)
    assert await connection.error_then_closed() == b"E_MPUB_FAILED MPUB failed mem-queue-size (3) reached for topic t"
    connection = await RawConnection.open(broker.tcp_address)
    connection.send(encode_pub("t", b"3") + encode_pub("t", b"4"))
    assert await connection.frame() == ResponseFrame(OK)
    assert await connection.error_then_closed() == b"E_PUB_FAILED PUB failed mem-queue-size (3) reached for topic t"
    consumer = await RawConnection.consumer(broker.tcp_address, "t", "c", rdy=10)
    assert [m.body for m in await consumer.messages(3)] == [b"1", b"2", b"3"]
    await consumer.nothing()


async def test_max_rdy_count_and_max_msg_size_are_honoured(start_broker: Any) -> None:
    broker = await start_broker(max_rdy_count=10, max_msg_size=100)
    connection = await RawConnection.open(broker.tcp_address)
    assert (await connection.identify())["max_rdy_count"] == 10
    connection.send(encode_pub("t", b"x" * 101))
    assert await connection.error_then_closed() == b"E_BAD_MESSAGE PUB message too big 101 > 100"
    consumer = await RawConnection.consumer(broker.tcp_address, "t", "c", rdy=0)
    consumer.send(encode_rdy(11))
    assert await consumer.error_then_closed() == b"E_INVALID RDY count 11 out of range 0-10"


@pytest.mark.usefixtures("prompt_queue_scan")
async def test_req_delay_is_clamped_to_max_req_timeout(start_broker: Any) -> None:
    broker = await start_broker(max_req_timeout=0.3)
    consumer = await RawConnection.consumer(broker.tcp_address, "t", "c")
    connection = await RawConnection.open(broker.tcp_address)
    connection.send(encode_pub("t", b"x"))
    message = await consumer.message()
    consumer.send(encode_req(message.id, 3_600_000))
    requeued = time.monotonic()
    assert (await consumer.message()).attempts == 2
    assert 0.25 <= time.monotonic() - requeued < 2


@pytest.mark.usefixtures("prompt_queue_scan")
async def test_touch_is_capped_by_max_msg_timeout(start_broker: Any) -> None:
    broker = await start_broker(msg_timeout=1.0, max_msg_timeout=1.5)
    consumer = await RawConnection.consumer(broker.tcp_address, "t", "c", msg_timeout=1000)
    connection = await RawConnection.open(broker.tcp_address)
    connection.send(encode_pub("t", b"x"))
    message = await consumer.message()
    delivered = time.monotonic()
    await asyncio.sleep(0.8)
    consumer.send(encode_touch(message.id))  # would move the deadline to 1.8 s; capped at 1.5 s
    assert (await consumer.message()).attempts == 2
    assert 1.4 <= time.monotonic() - delivered < 1.75


async def test_touch_schedules_nothing(start_broker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    broker = await start_broker(msg_timeout=1.0, max_msg_timeout=1.0)  # every TOUCH is capped
    consumer = await RawConnection.consumer(broker.tcp_address, "t", "c")
    connection = await RawConnection.open(broker.tcp_address)
    connection.send(encode_pub("t", b"x"))
    message = await consumer.message()
    timers = record_timers(monkeypatch, Client, ClientOutput, Channel)
    unknown = b"0" * 16
    consumer.send(encode_touch(message.id) * 1000 + encode_fin(unknown))
    assert await consumer.frame() == ErrorFrame(b"E_FIN_FAILED FIN " + unknown + b" failed ID not in flight")
    assert timers == []  # the queue scan finds the message when its capped deadline passes


async def test_deflate_level_is_capped_by_max_deflate_level(start_broker: Any) -> None:
    broker = await start_broker(max_deflate_level=3)
    connection = await RawConnection.open(broker.tcp_address)
    negotiated = await connection.identify()
    assert (negotiated["deflate"], negotiated["deflate_level"], negotiated["max_deflate_level"]) == (False, 3, 3)


# --- command line -----------------------------------------------------------------


def start_cli(*flags: str) -> tuple[subprocess.Popen[str], str, str]:
    """``python -m almanet broker`` on free ports; returns the process and its TCP and HTTP addresses."""
    process = subprocess.Popen(
        [sys.executable, "-m", "almanet", "broker", "--tcp-address=127.0.0.1:0", "--http-address=127.0.0.1:0", *flags],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stderr is not None
    addresses = []
    for line in process.stderr:
        if "listening on" in line:
            addresses.append(line.rsplit(" ", 1)[1].strip())
            if len(addresses) == 2:
                break
    assert len(addresses) == 2, "the broker logs where it listens"
    return process, addresses[0], addresses[1]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_cli_serves_and_stops_cleanly_on_a_signal(signum: int) -> None:
    process, _, http = start_cli("--msg-timeout=2s", "--mem-queue-size=5")
    try:
        with urllib.request.urlopen(f"http://{http}/ping", timeout=5) as response:
            assert response.read() == b"OK"
        process.send_signal(signum)
        assert process.wait(timeout=10) == 0
        assert process.stderr is not None
        assert "stopping" in process.stderr.read()
    finally:
        process.kill()
        process.wait()


def test_cli_refuses_a_bad_flag_value() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "almanet", "broker", "--msg-timeout=soon"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "--msg-timeout" in result.stderr and "invalid" in result.stderr


def test_console_script_is_installed() -> None:
    script = os.path.join(os.path.dirname(sys.executable), "almanet")
    result = subprocess.run([script, "broker", "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert "--max-rdy-count" in result.stdout and "--mem-queue-size" in result.stdout


# --- pytest plugin ----------------------------------------------------------------


def test_pytest_plugin_gives_a_running_broker(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(
        """
        import socket

        def test_broker(almanet_broker):
            host, port = almanet_broker.tcp_address.rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=5) as connection:
                connection.sendall(b"  V2PUB t\\n\\x00\\x00\\x00\\x01x")
                assert connection.recv(100) == b"\\x00\\x00\\x00\\x06\\x00\\x00\\x00\\x00OK"
            assert almanet_broker.http_address
        """
    )
    monkeypatch.delenv("ALMANET_TEST_NSQD", raising=False)  # brokers it starts, whatever this run uses
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=len(brokers_available()))  # once on each broker found
