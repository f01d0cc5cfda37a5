"""Routed RPC end to end: sessions call services through the broker (embedded, or nsqd with ALMANET_TEST_NSQD).

Each test registers its procedures under a prefix of its own, so tests can
share the broker. Services and sessions run in the test's event loop; the
tests of ``almanet serve`` and graceful shutdown run the service in a
process of its own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

import almanet
from almanet._speedups.envelope import encode_invocation
from almanet.nsq import Producer
from almanet.pytest_plugin import BrokerAddresses
from helpers import channel_stats, eventually, topic_stats, wait_until_served

pytestmark = pytest.mark.asyncio

TIMEOUT = 10.0
PROJECT = Path(__file__).resolve().parent.parent


class denied(almanet.rpc_error):
    """Custom RPC exception"""


class OutOfStock(almanet.rpc_error):
    name = "tests.shop.OutOfStock"  # a stable name, independent of the class's


def greeting_service(address: str, prefix: str, **options: Any) -> almanet.Service:
    """The README's service, under ``prefix``."""
    service = almanet.new_service(address, prefix=prefix, **options)

    @service.procedure
    async def greeting(payload: str, **kwargs: Any) -> str:
        if payload == "guest":
            raise denied()
        return f"Hello, {payload}!"

    return service


# --- the README flow --------------------------------------------------------------------


async def test_readme_flow(almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str) -> None:
    async with greeting_service(almanet_broker.tcp_address, prefix):
        result = await session.call(f"{prefix}.greeting", "Aidar")
        assert result.payload == "Hello, Aidar!"
        with pytest.raises(denied) as raised:
            await session.call(f"{prefix}.greeting", "guest")
        assert isinstance(raised.value, almanet.rpc_error)
        assert str(raised.value) == "denied"


async def test_a_session_entered_again_and_again_at_once_always_subscribes(
    almanet_broker: BrokerAddresses, prefix: str
) -> None:
    """As the seed README enters one session three times: each time a reply topic of its own, so nsqd deleting the
    last one (ephemeral, its channel gone) never refuses the SUB (E_SUB_FAILED exiting)."""
    session = almanet.new_session(almanet_broker.tcp_address)
    topics = set()
    async with greeting_service(almanet_broker.tcp_address, prefix):
        for _ in range(30):
            async with session:
                assert (await session.call(f"{prefix}.greeting", "again")).payload == "Hello, again!"
                topics.add(session.reply_topic)
    assert len(topics) == 30


async def test_a_procedure_object_is_called_by_its_uri(almanet_broker: BrokerAddresses, prefix: str) -> None:
    service = almanet.new_service(almanet_broker.tcp_address, prefix=prefix)

    @service.procedure(name="add")
    def add(payload: list[int], **kwargs: Any) -> int:  # sync: runs in the thread pool
        return sum(payload)

    assert add.uri == f"{prefix}.add"
    assert add([1, 2]) == 3  # still callable here
    async with service, almanet.new_session(almanet_broker.tcp_address) as session:
        assert (await session.call(add, [1, 2, 3])).payload == 6


async def test_payloads_of_every_msgpack_type_round_trip(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str
) -> None:
    service = almanet.new_service(almanet_broker.tcp_address, prefix=prefix)

    @service.procedure
    async def echo(payload: Any, **kwargs: Any) -> Any:
        return payload

    payloads = [None, True, 0, -1, 2**64 - 1, 1.5, "text", "ünïcode", b"\x00raw bytes", [1, "a"], {"k": [1, 2]}]
    async with service:
        replies = await asyncio.gather(*(session.call(echo, payload) for payload in payloads))
    assert [reply.payload for reply in replies] == payloads


async def test_the_procedure_gets_its_call_context(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str
) -> None:
    service = almanet.new_service(almanet_broker.tcp_address, prefix=prefix)
    seen: dict[str, Any] = {}

    @service.procedure
    async def inspect(payload: None, session: almanet.Session, deadline: float, caller: str, uri: str) -> None:
        seen.update(session=session, deadline=deadline, caller=caller, uri=uri)

    async with service:
        called = time.time()
        await session.call(inspect, None, timeout=5)
    assert seen["session"] is service.session
    assert seen["uri"] == f"{prefix}.inspect"
    assert seen["caller"] == session.reply_topic
    assert called + 4 < seen["deadline"] < time.time() + 5


# --- errors ---------------------------------------------------------------------------


async def test_rpc_errors_reach_the_caller_by_name(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str
) -> None:
    service = almanet.new_service(almanet_broker.tcp_address, prefix=prefix)

    @service.procedure
    async def buy(payload: str, **kwargs: Any) -> None:
        if payload == "known":
            raise OutOfStock("tea", 0, payload={"restock": "monday"})
        error = almanet.rpc_error("only the callee knows this class")
        error.name = "callee.Secret"
        raise error

    async with service:
        with pytest.raises(OutOfStock) as known:
            await session.call(buy, "known")
        assert known.value.args == ("tea", 0)
        assert known.value.payload == {"restock": "monday"}
        assert known.value.name == "tests.shop.OutOfStock"

        with pytest.raises(almanet.rpc_error) as unknown:
            await session.call(buy, "unknown")
        assert type(unknown.value) is almanet.rpc_error
        assert unknown.value.name == "callee.Secret"
        assert unknown.value.args == ("only the callee knows this class",)


async def test_an_unexpected_exception_is_an_internal_error_without_traceback(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    service = almanet.new_service(almanet_broker.tcp_address, prefix=prefix)

    @service.procedure
    async def broken(payload: Any, **kwargs: Any) -> None:
        raise KeyError("secret detail")

    @service.procedure
    async def unencodable(payload: Any, **kwargs: Any) -> object:
        return object()

    async with service:
        with pytest.raises(almanet.InternalError) as raised:
            await session.call(broken, None)
        assert raised.value.args == ("KeyError: 'secret detail'",)
        assert "Traceback" not in str(raised.value.args)
        with pytest.raises(almanet.InternalError, match="cannot be encoded"):
            await session.call(unencodable, None)
    assert "Traceback" in caplog.text  # the callee logs it


async def test_a_payload_the_procedure_does_not_take_is_refused(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str
) -> None:
    async with greeting_service(almanet_broker.tcp_address, prefix):
        with pytest.raises(almanet.InvalidPayload, match="int"):
            await session.call(f"{prefix}.greeting", 42)
        assert (await session.call(f"{prefix}.greeting", "again")).payload == "Hello, again!"


@pytest.mark.parametrize("uri", ["", "has space", "x" * 65, "_reserved", "ends#ephemeral", "naïve"])
async def test_invalid_uris_are_refused(almanet_broker: BrokerAddresses, session: almanet.Session, uri: str) -> None:
    with pytest.raises(ValueError, match="URI"):
        await session.call(uri, None)
    with pytest.raises(ValueError, match="URI"):
        session.delay_call(uri, None, 1.0)
    service = almanet.new_service(almanet_broker.tcp_address)
    with pytest.raises(ValueError, match="URI"):
        service.procedure(name=uri)(lambda payload: None)


async def test_names_too_long_for_nsq_are_refused_at_registration(almanet_broker: BrokerAddresses) -> None:
    service = almanet.new_service(almanet_broker.tcp_address, prefix="p" * 60)
    with pytest.raises(ValueError, match="URI"):

        @service.procedure
        async def procedure_name_too_long(payload: None) -> None: ...

    with pytest.raises(ValueError, match="channel"):
        almanet.new_service(almanet_broker.tcp_address).procedure(name="fine", channel="bad channel")(
            lambda payload: None
        )


# --- timeouts and the pending-call table --------------------------------------------------


async def test_a_call_nobody_serves_fails_fast_and_leaves_nothing_behind(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str
) -> None:
    started = time.monotonic()
    with pytest.raises(almanet.NoResponders, match=f"nothing serves {prefix}.nobody"):
        await session.call(f"{prefix}.nobody", "hello?")  # the default timeout: 60 s
    assert time.monotonic() - started < 1
    await eventually(lambda: len(session._calls.table) == 0)  # the discovery query too, once its wait ends
    assert await topic_stats(almanet_broker.http_address, f"{prefix}.nobody") is None  # never published
    with pytest.raises(TimeoutError):  # existing `except TimeoutError` still catches it
        await session.multicall(f"{prefix}.nobody", "hello?")


async def test_many_calls_nobody_serves_share_one_discovery_query(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str
) -> None:
    calls = [session.call(f"{prefix}.nobody", number) for number in range(1000)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(result, almanet.NoResponders) for result in results)
    await eventually(lambda: len(session._calls.table) == 0)  # the discovery query too, once its wait ends
    assert await topic_stats(almanet_broker.http_address, f"{prefix}.nobody") is None


async def test_a_call_shorter_than_the_discovery_wait_times_out_as_asked(session: almanet.Session, prefix: str) -> None:
    started = time.monotonic()
    with pytest.raises(almanet.CallTimeout, match="no reply") as raised:
        await session.call(f"{prefix}.nobody", "hello?", timeout=0.2)
    assert not isinstance(raised.value, almanet.NoResponders)
    assert 0.2 <= time.monotonic() - started < 2
    await eventually(lambda: len(session._calls.table) == 0)  # the discovery query, once its wait is over


async def test_a_service_started_after_a_failed_call_is_found_by_the_next(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str
) -> None:
    with pytest.raises(almanet.NoResponders):
        await session.call(f"{prefix}.greeting", "early")
    async with greeting_service(almanet_broker.tcp_address, prefix):
        assert (await session.call(f"{prefix}.greeting", "Aidar")).payload == "Hello, Aidar!"


async def test_a_stopped_service_is_found_gone_once_its_uri_is_no_longer_known_served(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str
) -> None:
    async with greeting_service(almanet_broker.tcp_address, prefix):
        await session.call(f"{prefix}.greeting", "Aidar")
    session._discovery.served_until.clear()  # as SERVED_FOR after the last reply
    started = time.monotonic()
    with pytest.raises(almanet.NoResponders):
        await session.call(f"{prefix}.greeting", "Aidar")
    assert time.monotonic() - started < 1


async def test_a_slow_procedure_times_out_and_its_late_reply_is_dropped(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="almanet")
    service = almanet.new_service(almanet_broker.tcp_address, prefix=prefix)

    @service.procedure
    async def slow(payload: float, **kwargs: Any) -> float:
        await asyncio.sleep(payload)
        return payload

    async with service:
        with pytest.raises(TimeoutError):
            await session.call(slow, 0.3, timeout=0.1)
        assert (await session.call(slow, 0.0, timeout=5)).payload == 0.0
        await eventually(lambda: "which is over" in caplog.text)  # the late reply came, found no call
        await eventually(lambda: len(session._calls.table) == 0)  # the discovery query too, once its wait ends


async def test_a_procedure_slower_than_msg_timeout_runs_once_per_call(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The service TOUCHes the invocations it runs: nsqd never hands one to an instance again while it runs."""
    service = almanet.new_service(almanet_broker.tcp_address, prefix=prefix)
    runs: list[str] = []

    @service.procedure(msg_timeout=1.0)
    async def slow(payload: str) -> str:
        await asyncio.sleep(2.5)
        runs.append(payload)
        return payload

    @service.procedure(msg_timeout=1.0)
    def slow_sync(payload: str) -> str:
        time.sleep(2.5)
        runs.append(payload)
        return payload

    async with service:
        # nsqd's queue scan finds a channel's timed-out messages once the channel is 5 s old (docs/NSQD.md).
        await asyncio.sleep(5.5)
        calls = [session.call(f"{prefix}.{name}", f"{name} {number}", timeout=10) for name in ("slow", "slow_sync")
                 for number in range(3)]  # fmt: skip
        replies = await asyncio.gather(*calls)
        await asyncio.sleep(1.5)  # a second run, if any, would finish by now
    expected = sorted(f"{name} {number}" for name in ("slow", "slow_sync") for number in range(3))
    assert sorted(reply.payload for reply in replies) == expected
    assert sorted(runs) == expected
    assert "E_FIN_FAILED" not in caplog.text


async def never_answering_service(address: str, prefix: str) -> almanet.Service:
    service = almanet.new_service(address, prefix=prefix)

    @service.procedure
    async def silent(payload: Any, **kwargs: Any) -> None:
        await asyncio.Event().wait()

    return service


async def test_calls_with_different_timeouts_expire_in_deadline_order(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str
) -> None:
    order: list[float] = []

    async def call(timeout: float) -> None:
        with pytest.raises(TimeoutError):
            await session.call(f"{prefix}.silent", None, timeout=timeout)
        order.append(timeout)

    async with await never_answering_service(almanet_broker.tcp_address, prefix) as service:
        await asyncio.gather(call(0.4), call(0.1), call(0.25))
        await service.stop(timeout=0)
    assert order == [0.1, 0.25, 0.4]


async def test_a_cancelled_call_leaves_no_entry(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str
) -> None:
    async with await never_answering_service(almanet_broker.tcp_address, prefix) as service:
        calls = [asyncio.ensure_future(session.call(f"{prefix}.silent", None, timeout=30)) for _ in range(100)]
        await eventually(lambda: len(session._calls.table) == 100)
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        await service.stop(timeout=0)
    await eventually(lambda: len(session._calls.table) == 0)  # the discovery query too, once its wait ends
    assert session._calls.table.next_deadline() is None


async def test_ten_thousand_concurrent_calls_leave_the_pending_table_empty(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str
) -> None:
    async with greeting_service(almanet_broker.tcp_address, prefix):
        replies = await asyncio.wait_for(
            asyncio.gather(*(session.call(f"{prefix}.greeting", f"n{number}") for number in range(10_000))), 60
        )
    assert [reply.payload for reply in replies] == [f"Hello, n{number}!" for number in range(10_000)]
    await eventually(lambda: len(session._calls.table) == 0)  # the discovery query too, once its wait ends
    assert session._calls.table.next_deadline() is None


async def test_an_invocation_past_its_deadline_is_dropped_unrun(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str
) -> None:
    ran: list[str] = []
    service = almanet.new_service(almanet_broker.tcp_address, prefix=prefix)

    @service.procedure
    async def record(payload: str, **kwargs: Any) -> None:
        ran.append(payload)

    async with Producer(almanet_broker.tcp_address) as producer:
        past = int(time.time() * 1000) - 1000
        await producer.publish(f"{prefix}.record", encode_invocation(1, session.reply_topic, past, None, "stale"))
        await producer.publish(f"{prefix}.record", encode_invocation(0, None, 0, None, "fresh"))
    async with service:  # the invocations waited in the topic
        await eventually(lambda: ran)
        await session.call(record, "after")
    assert ran == ["fresh", "after"]


# --- bad input on a procedure's topic --------------------------------------------------------


async def test_bodies_that_are_not_invocations_are_answered_and_finished(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str
) -> None:
    async with greeting_service(almanet_broker.tcp_address, prefix):
        await session.call(f"{prefix}.greeting", "warm-up")  # the reply topic exists
        topic = f"{prefix}.greeting"
        future_version = msgpack.packb([2, 0, 77, session.reply_topic, "a future field"])
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        call_id = session._calls.table.add(almanet.calls.Call(waiter, topic, 10), loop.time() + 10)
        not_envelope = msgpack.packb([1, 0, call_id, session.reply_topic, 0, None])  # six elements
        async with Producer(almanet_broker.tcp_address) as producer:
            await producer.publish(topic, b"not msgpack at all \xc1")
            await producer.publish(topic, future_version)
            await producer.publish(topic, not_envelope)
        with pytest.raises(almanet.InvalidEnvelope):
            await asyncio.wait_for(waiter, TIMEOUT)
        assert (await session.call(topic, "still serving")).payload == "Hello, still serving!"
    # Nothing was requeued: every bad body was FINed at once.
    stats = await channel_stats(almanet_broker.http_address, topic, "rpc")
    assert (stats["requeue_count"], stats["depth"], stats["in_flight_count"]) == (0, 0, 0)


# --- multicall, channels, delay_call ------------------------------------------------------


async def test_multicall_gets_one_reply_per_channel(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str
) -> None:
    services = []
    for channel in ("north", "south"):
        service = almanet.new_service(almanet_broker.tcp_address, prefix=prefix)

        @service.procedure(name="where", channel=channel)
        async def where(payload: None, *, where: str = channel, **kwargs: Any) -> str:
            return where

        services.append(service)
    async with services[0], services[1]:
        replies = await session.multicall(f"{prefix}.where", None, timeout=5, count=2)
        assert sorted(reply.payload for reply in replies) == ["north", "south"]  # type: ignore[union-attr]
        started = time.monotonic()
        replies = await session.multicall(f"{prefix}.where", None, timeout=0.3)
        assert time.monotonic() - started >= 0.3  # no count: all the replies within the timeout
        assert len(replies) == 2
    await eventually(lambda: len(session._calls.table) == 0)  # the discovery query too, once its wait ends


async def test_instances_sharing_a_channel_share_the_calls(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str
) -> None:
    served: dict[str, int] = {"first": 0, "second": 0}
    services = []
    for instance in served:
        service = almanet.new_service(almanet_broker.tcp_address, prefix=prefix)

        @service.procedure(name="work", max_concurrency=1)
        async def work(payload: None, *, instance: str = instance, **kwargs: Any) -> str:
            served[instance] += 1
            await asyncio.sleep(0.005)
            return instance

        services.append(service)
    async with services[0], services[1]:
        replies = await asyncio.gather(*(session.call(f"{prefix}.work", None) for _ in range(40)))
    assert sum(served.values()) == 40  # each call served once
    assert served["first"] > 5 and served["second"] > 5
    assert {reply.payload for reply in replies} == {"first", "second"}


async def test_delay_call_invokes_later_without_a_reply(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str
) -> None:
    service = almanet.new_service(almanet_broker.tcp_address, prefix=prefix)
    invoked: asyncio.Future[tuple[str, float, str | None]] = asyncio.get_running_loop().create_future()

    @service.procedure
    async def remind(payload: str, caller: str | None, **kwargs: Any) -> str:
        invoked.set_result((payload, time.monotonic(), caller))
        return "nobody reads this"

    async with service:
        sent = time.monotonic()
        assert await session.delay_call(remind, "wake up", 0.3) == b"OK"
        payload, at, caller = await asyncio.wait_for(invoked, TIMEOUT)
    assert payload == "wake up"
    assert caller is None
    assert at - sent >= 0.3


# --- graceful shutdown and the command line --------------------------------------------------


def almanet_command(*args: str, address: str) -> subprocess.Popen[str]:
    env = dict(os.environ, ALMANET_ADDRESSES=address)
    return subprocess.Popen(
        [sys.executable, "-m", "almanet", *args],
        cwd=PROJECT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def test_serve_stops_gracefully_on_sigterm_finishing_the_calls_in_flight(
    almanet_broker: BrokerAddresses, session: almanet.Session
) -> None:
    service = almanet_command("serve", "examples.microservice:service", address=almanet_broker.tcp_address)
    try:
        await asyncio.to_thread(wait_until_served, almanet_broker.tcp_address, "net.example.greeting")
        calls = [asyncio.ensure_future(session.call("net.example.slow_echo", 0.5, timeout=TIMEOUT)) for _ in range(20)]

        async def in_flight() -> int:
            stats = await channel_stats(almanet_broker.http_address, "net.example.slow_echo", "rpc")
            return stats["in_flight_count"] if stats else 0

        while await in_flight() < 20:  # all of them running in the service
            await asyncio.sleep(0.01)
        service.send_signal(signal.SIGTERM)
        replies = await asyncio.wait_for(asyncio.gather(*calls), TIMEOUT)
        assert [reply.payload for reply in replies] == [0.5] * 20
        assert await asyncio.to_thread(service.wait, TIMEOUT) == 0
    finally:
        service.kill()
        _, errors = service.communicate()
    assert "stopping" in errors


async def test_almanet_call_prints_the_result_as_json(almanet_broker: BrokerAddresses, prefix: str) -> None:
    async with greeting_service(almanet_broker.tcp_address, prefix):
        address = almanet_broker.tcp_address
        called = almanet_command("call", f"{prefix}.greeting", '"CLI"', "--address", address, address=address)
        output, errors = await asyncio.to_thread(called.communicate, None, TIMEOUT)
        assert called.returncode == 0, errors
        assert json.loads(output) == "Hello, CLI!"

        refused = almanet_command("call", f"{prefix}.greeting", '"guest"', "--address", address, address=address)
        output, errors = await asyncio.to_thread(refused.communicate, None, TIMEOUT)
        assert refused.returncode == 1
        assert "denied" in errors


# --- no broker ---------------------------------------------------------------------------------


async def test_without_a_reachable_nsqd_joining_and_calling_fail_at_once() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        nowhere = f"127.0.0.1:{probe.getsockname()[1]}"
    session = almanet.new_session(nowhere)
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(session.join(), TIMEOUT)
    started = time.monotonic()
    for _ in range(2):  # the second call tries to subscribe again
        with pytest.raises(ConnectionError):
            await session.call("nowhere.procedure", None, timeout=30)
    assert time.monotonic() - started < TIMEOUT
    await session.leave()
    with pytest.raises(ConnectionError, match="left"):
        await session.call("nowhere.procedure", None)


async def test_uris_no_longer_known_served_are_forgotten_past_a_bound(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(almanet.discovery, "SERVED_KEPT", 10)
    session._discovery.served_until.update({f"{prefix}.gone{number}": 0.0 for number in range(10)})
    async with greeting_service(almanet_broker.tcp_address, prefix):
        await session.call(f"{prefix}.greeting", "Aidar")
    assert set(session._discovery.served_until) <= {f"{prefix}.greeting", almanet.rpc.DISCOVERY_TOPIC}
