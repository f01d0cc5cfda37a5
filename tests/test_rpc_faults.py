"""Sessions and services when things go wrong: procedures that die oddly, an nsqd that stops answering, races.

An nsqd that misbehaves is the scripted fake of tests/fakensqd.py, or a real
one frozen with SIGSTOP (nsqd, or ``almanet broker``, in a process of its
own); the rest runs on an embedded broker of the test's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from fakensqd import FakeClient, FakeNsqd

import almanet
from almanet.broker import Broker
from almanet.broker.nsqd import DaemonProcess, find_nsqd
from almanet.nsq import Producer
from almanet.pytest_plugin import broker_in_thread
from helpers import eventually

pytestmark = pytest.mark.asyncio

TIMEOUT = 10.0


def own_broker(**settings: Any) -> Broker:
    return Broker(tcp_address="127.0.0.1:0", http_address="127.0.0.1:0", **settings)


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text")


async def test_procedures_that_end_oddly_are_answered_once_and_never_redelivered() -> None:
    calls: dict[str, int] = {}
    async with own_broker(msg_timeout=1.0) as broker:
        service = almanet.new_service(broker.tcp_address, prefix="odd")

        def count(name: str) -> None:
            calls[name] = calls.get(name, 0) + 1

        @service.procedure
        async def cancelled(payload: None, **kwargs: Any) -> None:
            count("cancelled")
            other = asyncio.ensure_future(asyncio.sleep(10))
            other.cancel()
            await other

        @service.procedure
        def exits(payload: None, **kwargs: Any) -> None:
            count("exits")
            sys.exit(3)

        @service.procedure
        async def unprintable(payload: None, **kwargs: Any) -> None:
            count("unprintable")
            raise Unprintable()

        @service.procedure
        async def too_big(payload: None, **kwargs: Any) -> bytes:
            count("too_big")
            return b"x" * (1024 * 1024 + 1)

        async with service, almanet.new_session(broker.tcp_address) as session:
            for name, expected in (
                ("cancelled", "CancelledError"),
                ("exits", "SystemExit: 3"),
                ("unprintable", "Unprintable"),
                ("too_big", "too big"),
            ):
                with pytest.raises(almanet.InternalError, match=expected):
                    await session.call(f"odd.{name}", None, timeout=5)
            await asyncio.sleep(1.5)  # past msg_timeout: anything left unanswered would come back
            assert all(consumer.in_flight == 0 for consumer in service._consumers)
    assert calls == {"cancelled": 1, "exits": 1, "unprintable": 1, "too_big": 1}


async def serve_identify_only(client: FakeClient) -> None:
    """An nsqd that answers IDENTIFY, then nothing."""
    await client.handshake()
    await client.closed(answer_cls=False)


async def test_a_call_is_bounded_by_its_timeout_when_nsqd_does_not_answer_sub() -> None:
    async with FakeNsqd(serve_identify_only) as nsqd:
        session = almanet.new_session(nsqd.address)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await session.call("silent.procedure", None, timeout=0.5)
        assert time.monotonic() - started < 2
        await asyncio.wait_for(session.leave(timeout=0.5), TIMEOUT)


async def test_leave_is_bounded_by_its_timeout_when_nsqd_does_not_answer_publishes() -> None:
    async with FakeNsqd(serve_identify_only) as nsqd:
        session = almanet.new_session(nsqd.address)
        await session.join()
        produced = session.produce("orders", b"never answered", raw=True)
        started = time.monotonic()
        await asyncio.wait_for(session.leave(timeout=0.5), TIMEOUT)
        assert time.monotonic() - started < 2
        with pytest.raises(ConnectionError):
            await produced


async def test_stop_while_starting_leaves_nothing_subscribed() -> None:
    async with own_broker() as broker:
        service = almanet.new_service(broker.tcp_address, prefix="race")
        for number in range(5):
            service.procedure(name=f"p{number}")(lambda payload: payload)
        starting = asyncio.ensure_future(service.start())
        while not service._consumers:
            await asyncio.sleep(0)
        await asyncio.wait_for(service.stop(timeout=1), TIMEOUT)
        with pytest.raises(ConnectionError):
            await starting
        await asyncio.sleep(0.1)
        assert all(
            not topic.channels or not any(c.clients for c in topic.channels.values())
            for topic in broker.topics.values()
        )


async def test_calls_fail_at_once_when_their_connection_is_lost_and_the_next_ones_work() -> None:
    async with own_broker() as broker:
        service = almanet.new_service(broker.tcp_address, prefix="lost")

        @service.procedure
        async def slow(payload: float, **kwargs: Any) -> float:
            await asyncio.sleep(payload)
            return payload

        async with service, almanet.new_session(broker.tcp_address) as session:
            assert (await session.call(slow, 0.0)).payload == 0.0
            waiting = [asyncio.ensure_future(session.call(slow, 1.0, timeout=30)) for _ in range(3)]
            await asyncio.sleep(0.2)  # published, running in the service
            started = time.monotonic()
            connection = session._calls.connection
            assert connection is not None
            connection.abort()
            results = await asyncio.gather(*waiting, return_exceptions=True)
            assert all(isinstance(result, ConnectionError) for result in results), results
            assert time.monotonic() - started < 1  # not the 30 s timeout
            await eventually(lambda: len(session._calls.table) == 0)  # the discovery query too, once its wait ends
            # The reply subscription reconnects; calls go through the new connection.
            deadline = time.monotonic() + TIMEOUT
            while True:
                try:
                    assert (await session.call(slow, 0.0, timeout=2)).payload == 0.0
                    break
                except ConnectionError:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)


def stopped(pid: int) -> bool:
    """Whether every thread of process ``pid`` is stopped (state T in /proc)."""
    threads = os.listdir(f"/proc/{pid}/task")
    states = (Path(f"/proc/{pid}/task/{thread}/stat").read_text().rpartition(")")[2].split()[0] for thread in threads)
    return all(state == "T" for state in states)


@pytest.mark.parametrize("kind", ["embedded", "nsqd"])
async def test_a_frozen_nsqd_is_named_and_not_taken_for_nothing_serving(kind: str) -> None:
    """nsqd stopped (SIGSTOP) under calls: the calls say nsqd did not answer; NoResponders is for nothing serving."""
    if kind == "nsqd":
        executable = find_nsqd()
        if executable is None:
            pytest.skip("nsqd not found")
        command = [executable, "-tcp-address=127.0.0.1:0", "-http-address=127.0.0.1:0", "-https-address=127.0.0.1:0"]
    else:
        command = [sys.executable, "-m", "almanet", "broker", "--tcp-address=127.0.0.1:0", "--http-address=127.0.0.1:0"]
    with tempfile.TemporaryDirectory() as data_path:
        if kind == "nsqd":
            command.append(f"-data-path={data_path}")
        daemon = await asyncio.to_thread(DaemonProcess, command)
        try:
            service = almanet.new_service(daemon.tcp_address, prefix="frozen")

            @service.procedure
            async def greeting(payload: str) -> str:
                return f"Hello, {payload}!"

            async with service, almanet.new_session(daemon.tcp_address) as session:
                assert (await session.call("frozen.greeting", "x")).payload == "Hello, x!"
                os.kill(daemon.process.pid, signal.SIGSTOP)
                await eventually(lambda: stopped(daemon.process.pid))  # every thread of it, not only the signal sent
                try:
                    for uri in ("frozen.greeting", "frozen.unknown"):  # known served, then to be asked about
                        with pytest.raises(almanet.CallTimeout) as raised:
                            await session.call(uri, "x", timeout=1.0)
                        assert not isinstance(raised.value, almanet.NoResponders)
                        assert f"nsqd at {daemon.tcp_address} did not answer within" in str(raised.value)
                finally:
                    os.kill(daemon.process.pid, signal.SIGCONT)
                assert (await session.call("frozen.greeting", "again")).payload == "Hello, again!"
                with pytest.raises(almanet.NoResponders):
                    await session.call("frozen.unknown", "x")
        finally:
            await asyncio.to_thread(daemon.stop)


async def test_invocations_held_past_max_concurrency_all_run_when_one_is_refused() -> None:
    """Three nsqd, max_concurrency 1: each nsqd may hand one invocation out (RDY 1), the service holds what it
    cannot run. A held one refused at once (not an envelope) hands the turn on to the next held one."""
    with contextlib.ExitStack() as stack:
        brokers = [
            stack.enter_context(broker_in_thread(tcp_address="127.0.0.1:0", http_address="127.0.0.1:0"))
            for _ in range(3)
        ]
        addresses = [broker.tcp_address for broker in brokers]
        service = almanet.new_service(*addresses, prefix="held")

        @service.procedure(max_concurrency=1)
        async def slow(payload: float) -> float:
            await asyncio.sleep(payload)
            return payload

        async with (
            service,
            almanet.new_session(addresses[0]) as first,
            almanet.new_session(addresses[2]) as third,
            Producer(addresses[1]) as garbage,
        ):
            running = asyncio.ensure_future(first.call("held.slow", 1.0))
            await asyncio.sleep(0.3)
            await garbage.publish("held.slow", b"not an envelope")
            await asyncio.sleep(0.2)
            started = time.monotonic()
            assert (await third.call("held.slow", 0.0, timeout=5.0)).payload == 0.0
            assert time.monotonic() - started < 2.0
            assert (await running).payload == 1.0
