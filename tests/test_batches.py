"""Batches: invocations to a URI made in one loop iteration travel as one NSQ message, and their replies too.

A session batches the invocations to a URI once a discovery query's wait
(``DISCOVERY_WAIT``) ended with every service's answer saying it takes batches
(``almanet.rpc.SERVICE_FEATURES``), until a later query finds one that does
not. ``topic_stats(...)["message_count"]`` counts NSQ messages, not calls: it
tells batches from lone invocations. Each test registers its procedures under a
prefix of its own, so tests share the broker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import pytest

import almanet
import almanet.discovery
import almanet.service
from almanet._speedups.envelope import Invocation, batch_items, decode, encode_batch, encode_invocation, encode_reply
from almanet.discovery import DiscoveryQuery
from almanet.nsq import Producer
from almanet.pytest_plugin import BrokerAddresses, broker_in_thread
from almanet.rpc import BATCH_ITEMS, BATCH_SIZE, DISCOVERY_TOPIC
from almanet.wire.errors import ConnectionFailed
from helpers import eventually, topic_stats

pytestmark = pytest.mark.asyncio

TIMEOUT = 10.0


class Negative(almanet.rpc_error):
    name = "tests.batches.Negative"  # a stable name, independent of the class's


async def messages_on(http_address: str, topic: str) -> int:
    """How many NSQ messages ``topic`` got (a batch counts one), 0 while it does not exist."""
    stats = await topic_stats(http_address, topic)
    return 0 if stats is None else int(stats["message_count"])


def discovery_over(session: almanet.Session) -> bool:
    """Whether no discovery query of ``session`` still gathers answers (its wait ended)."""
    return not any(isinstance(call, DiscoveryQuery) for _, call in session._calls.table.items())


async def batching_on(session: almanet.Session, uri: str, payload: Any) -> None:
    """Call ``uri`` once, then wait until the discovery query's wait ended and its invocations go in batches."""
    await session.call(uri, payload, timeout=TIMEOUT)
    await eventually(lambda: uri in session._discovery.batches)


def waiting_calls(session: almanet.Session, uri: str) -> list[tuple[int, Any]]:
    """The calls of ``session`` to ``uri`` whose invocation nsqd took, waiting for their reply, with their call ids."""
    return [(call_id, call) for call_id, call in session._calls.table.items() if call.uri == uri and call.published]


def takes_no_batches(service: almanet.Service, monkeypatch: pytest.MonkeyPatch) -> None:
    """``service`` answers discovery queries as an almanet before batches did (payload nil); other services in the
    process (``almanet.service.SERVICE_FEATURES``) go on announcing them."""
    send = service._replies.send

    def send_without_features(message: Any, uri: str, reply_to: str, call_id: int, ok: bool, payload: Any) -> None:
        send(message, uri, reply_to, call_id, ok, None if uri == DISCOVERY_TOPIC else payload)

    monkeypatch.setattr(service._replies, "send", send_without_features)


async def assert_calls_go_alone(broker: BrokerAddresses, session: almanet.Session, uri: str) -> None:
    """After a first call and its discovery wait, ``uri`` is not batched: 200 concurrent calls, 200 messages."""
    assert (await session.call(uri, "first")).payload == "first"
    await eventually(lambda: discovery_over(session))
    assert uri not in session._discovery.batches
    replies = await asyncio.gather(*(session.call(uri, number) for number in range(200)))
    assert [reply.payload for reply in replies] == list(range(200))
    assert await messages_on(broker.http_address, uri) == 1 + 200


def echo_service(address: str, prefix: str, **options: Any) -> almanet.Service:
    service = almanet.new_service(address, prefix=prefix, **options)

    @service.procedure
    async def echo(payload: Any) -> Any:
        return payload

    return service


# --- batches, and when calls go alone -------------------------------------------------


async def test_concurrent_calls_after_the_discovery_wait_travel_in_batches(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str
) -> None:
    service = almanet.new_service(almanet_broker.tcp_address, prefix=prefix)

    @service.procedure
    async def square(payload: int) -> int:
        if payload < 0:
            raise Negative(f"{payload} is negative")
        return payload * payload

    uri = f"{prefix}.square"
    async with service:
        await batching_on(session, uri, 3)
        invocations = await messages_on(almanet_broker.http_address, uri)
        replies = await messages_on(almanet_broker.http_address, session.reply_topic)
        payloads: list[Any] = [number if number % 50 else f"not {number}" for number in range(-200, 300)]
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(session.call(square, payload) for payload in payloads), return_exceptions=True), TIMEOUT
        )
        for payload, outcome in zip(payloads, outcomes, strict=True):
            if isinstance(payload, str):
                assert isinstance(outcome, almanet.InvalidPayload), (payload, outcome)
            elif payload < 0:
                assert isinstance(outcome, Negative) and outcome.args == (f"{payload} is negative",), (payload, outcome)
            else:
                assert isinstance(outcome, almanet.Reply) and outcome.payload == payload * payload, (payload, outcome)
                assert type(outcome.payload) is int
        calls = len(payloads)
        assert await messages_on(almanet_broker.http_address, uri) - invocations < calls / 2
        assert await messages_on(almanet_broker.http_address, session.reply_topic) - replies < calls / 2
        assert uri in session._discovery.batches


async def test_a_lone_call_goes_alone_and_a_batch_keeps_within_its_limits(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str
) -> None:
    uri = f"{prefix}.echo"
    async with echo_service(almanet_broker.tcp_address, prefix):
        await batching_on(session, uri, "first")
        spy = session.consume(uri, "spy", output_buffer_size=-1)  # a copy of every message to the URI's topic
        await spy.start()
        try:
            before = await messages_on(almanet_broker.http_address, uri)
            for number in range(5):
                assert (await session.call(uri, number)).payload == number
            assert await messages_on(almanet_broker.http_address, uri) - before == 5
            for number in range(5):
                message = await asyncio.wait_for(anext(spy), TIMEOUT)
                message.commit()
                assert batch_items(message.body) is None  # a plain envelope, not a batch of one
                invocation = decode(message.body)
                assert isinstance(invocation, Invocation) and invocation.payload == number

            burst = list(range(BATCH_ITEMS + 8))  # small: more than BATCH_ITEMS would fit in BATCH_SIZE
            replies = await asyncio.gather(*(session.call(uri, number) for number in burst))
            assert [reply.payload for reply in replies] == burst
            items: list[int] = []
            while sum(items) < len(burst):
                message = await asyncio.wait_for(anext(spy), TIMEOUT)
                message.commit()
                batch = batch_items(message.body)
                assert batch is not None and len(batch) <= BATCH_ITEMS
                items.append(len(batch))
            assert items == [BATCH_ITEMS, 8]

            big = ["x" * 1000 + str(number) for number in range(10)]  # 4 fit in BATCH_SIZE, not 5
            replies = await asyncio.gather(*(session.call(uri, payload) for payload in big))
            assert [reply.payload for reply in replies] == big
            seen: list[Any] = []
            while len(seen) < len(big):
                message = await asyncio.wait_for(anext(spy), TIMEOUT)
                message.commit()
                assert len(message.body) <= BATCH_SIZE
                batch = batch_items(message.body)
                parts = [message.body] if batch is None else batch
                seen.extend(decode(part).payload for part in parts)
            assert seen == big
        finally:
            await spy.stop()


async def test_calls_before_the_discovery_wait_ends_are_not_batched(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str
) -> None:
    uri = f"{prefix}.echo"
    async with echo_service(almanet_broker.tcp_address, prefix):
        assert (await session.call(uri, "first")).payload == "first"
        assert not discovery_over(session) and uri not in session._discovery.batches  # the query still gathers
        replies = await asyncio.gather(*(session.call(uri, number) for number in range(100)))
        assert [reply.payload for reply in replies] == list(range(100))
        assert await messages_on(almanet_broker.http_address, uri) == 1 + 100  # one message a call
        await eventually(lambda: uri in session._discovery.batches)
        replies = await asyncio.gather(*(session.call(uri, number) for number in range(100)))
        assert [reply.payload for reply in replies] == list(range(100))
        assert await messages_on(almanet_broker.http_address, uri) < 1 + 100 + 100 / 2


@pytest.mark.parametrize("max_concurrency", [3, BATCH_ITEMS])
async def test_max_concurrency_bounds_the_invocations_running_at_once(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str, max_concurrency: int
) -> None:
    """A procedure that runs fewer calls at once than a batch holds takes no batches; one that runs as many does."""
    service = almanet.new_service(almanet_broker.tcp_address, prefix=prefix)
    running = most = 0

    @service.procedure(max_concurrency=max_concurrency)
    async def work(payload: int) -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            await asyncio.sleep(0.002)
        finally:
            running -= 1
        return payload

    uri = f"{prefix}.work"
    async with service:
        await session.call(uri, -1, timeout=TIMEOUT)
        await eventually(lambda: discovery_over(session))
        assert (uri in session._discovery.batches) is (max_concurrency >= BATCH_ITEMS)
        before = await messages_on(almanet_broker.http_address, uri)
        replies = await asyncio.wait_for(asyncio.gather(*(session.call(work, number) for number in range(500))), 20)
        assert [reply.payload for reply in replies] == list(range(500))
        messages = await messages_on(almanet_broker.http_address, uri) - before
        assert messages < 500 / 2 if max_concurrency >= BATCH_ITEMS else messages == 500
    assert most == max_concurrency


async def test_calls_in_batches_spread_over_the_instances(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str
) -> None:
    served = [0, 0, 0]
    services = []
    for instance in range(3):
        service = almanet.new_service(almanet_broker.tcp_address, prefix=prefix)

        # At most a batch's items at once each: with 1000 (the default) nsqd may hand most of a burst to one
        # consumer, batches or not, and 20% is nobody's promise there. Its RDY counts the items of batches.
        @service.procedure(name="work", max_concurrency=BATCH_ITEMS)
        async def work(payload: int, *, instance: int = instance, **kwargs: Any) -> int:
            served[instance] += 1
            await asyncio.sleep(0.002)
            return payload

        services.append(service)
    uri = f"{prefix}.work"
    async with services[0], services[1], services[2]:
        await batching_on(session, uri, -1)
        served[:] = [0, 0, 0]
        before = await messages_on(almanet_broker.http_address, uri)
        for burst in range(6):
            payloads = range(burst * 500, (burst + 1) * 500)
            replies = await asyncio.wait_for(asyncio.gather(*(session.call(uri, number) for number in payloads)), 20)
            assert [reply.payload for reply in replies] == list(payloads)
        assert await messages_on(almanet_broker.http_address, uri) - before < 3000 / 2
    assert sum(served) == 3000  # each call run once
    assert min(served) >= 0.2 * 3000, served


KILLED_APP = """
import asyncio

import almanet

# msg_timeout 1 s: what it held when killed is handed out again soon.
service = almanet.new_service("127.0.0.1:4150", prefix={prefix!r}, msg_timeout=1)


@service.procedure
async def echo(payload: int) -> int:
    with open({started!r}, "a") as started:
        started.write(f"{{payload}}\\n")
    await asyncio.sleep(0.2)
    return payload
"""


async def test_an_instance_killed_mid_burst_loses_no_call(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    (tmp_path / "killed_app.py").write_text(KILLED_APP.format(prefix=prefix, started=str(started)))
    ran_here: list[int] = []
    service = almanet.new_service(almanet_broker.tcp_address, prefix=prefix)

    @service.procedure
    async def echo(payload: int) -> int:
        ran_here.append(payload)
        await asyncio.sleep(0.2)
        return payload

    uri = f"{prefix}.echo"
    command = [sys.executable, "-m", "almanet", "serve", "killed_app:service", "--address", almanet_broker.tcp_address]
    async with service:
        serving = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
        try:
            assert serving.stderr is not None
            line = "-"
            while " serving " not in line:
                line = await asyncio.wait_for(asyncio.to_thread(serving.stderr.readline), 30)
                assert line, "almanet serve ended before it served"
            threading.Thread(target=serving.stderr.read, daemon=True).start()
            await batching_on(session, uri, -1)  # both instances said they take batches
            ran_here.clear()
            started.unlink(missing_ok=True)  # the call above may have run there
            calls = asyncio.gather(*(session.call(uri, number, timeout=20) for number in range(300)))
            await eventually(started.exists)  # calls of the burst run there
            os.kill(serving.pid, signal.SIGKILL)
            replies = await asyncio.wait_for(calls, 30)
        finally:
            if serving.poll() is None:
                serving.kill()
            await asyncio.to_thread(serving.wait, 30)
    assert [reply.payload for reply in replies] == list(range(300))
    held_there = {int(line) for line in started.read_text().split()}
    assert held_there and held_there <= set(ran_here)  # killed mid-call: each ran here again


async def test_a_graceful_stop_mid_batch_runs_no_call_twice(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str
) -> None:
    """docs/RPC.md: a service stopping lets its calls running finish and reply, FINs them, and gives back those it
    holds (never started) for other instances. A call of a batch it finished must not run again elsewhere."""
    runs: Counter[int] = Counter()
    stopping = almanet.new_service(almanet_broker.tcp_address, prefix=prefix)

    @stopping.procedure(name="work", max_concurrency=BATCH_ITEMS)  # a batch at once; what comes on is held
    async def slow(payload: int, **kwargs: Any) -> int:
        runs[payload] += 1
        await asyncio.sleep(0.05)
        return payload

    staying = almanet.new_service(almanet_broker.tcp_address, prefix=prefix)

    @staying.procedure(name="work")
    async def fast(payload: int, **kwargs: Any) -> int:
        runs[payload] += 1
        return payload

    uri = f"{prefix}.work"
    await stopping.start()
    try:
        await batching_on(session, uri, -1)
        runs.clear()
        calls = asyncio.gather(*(session.call(uri, number) for number in range(3 * BATCH_ITEMS)))  # three batches
        await eventually(lambda: sum(runs.values()) >= 3)  # running, and maybe a batch held
        async with staying:
            await stopping.stop()
            replies = await asyncio.wait_for(calls, TIMEOUT)  # the held ones answered by the instance staying
    finally:
        await stopping.stop(timeout=0)
    assert [reply.payload for reply in replies] == list(range(3 * BATCH_ITEMS))
    expected = Counter(range(3 * BATCH_ITEMS))
    assert runs == expected, f"ran twice: {sorted(+runs - expected)}"


# --- services that take no batches ----------------------------------------------------


async def test_a_service_that_does_not_announce_batches_gets_one_invocation_a_message(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(almanet.service, "SERVICE_FEATURES", None)  # as an almanet before batches answers
    async with echo_service(almanet_broker.tcp_address, prefix):
        await assert_calls_go_alone(almanet_broker, session, f"{prefix}.echo")


async def test_one_instance_that_does_not_announce_batches_keeps_them_all_from_batches(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    announcing = echo_service(almanet_broker.tcp_address, prefix)
    silent = echo_service(almanet_broker.tcp_address, prefix)
    takes_no_batches(silent, monkeypatch)
    async with announcing, silent:
        await assert_calls_go_alone(almanet_broker, session, f"{prefix}.echo")


async def test_batches_stop_when_an_instance_that_takes_none_joins(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rollback: an instance of an almanet without batches joins those that take them."""
    monkeypatch.setattr(almanet.discovery, "BATCHES_CHECKED_EVERY", 0.3)
    uri = f"{prefix}.echo"
    async with echo_service(almanet_broker.tcp_address, prefix):
        await batching_on(session, uri, "first")
        old = echo_service(almanet_broker.tcp_address, prefix)
        takes_no_batches(old, monkeypatch)
        async with old:
            deadline = asyncio.get_running_loop().time() + TIMEOUT
            while uri in session._discovery.batches:  # calls meanwhile, in batches still, all answered
                assert asyncio.get_running_loop().time() < deadline, "still in batches"
                replies = await asyncio.gather(*(session.call(uri, number) for number in range(50)))
                assert [reply.payload for reply in replies] == list(range(50))
                await asyncio.sleep(0.05)
            before = await messages_on(almanet_broker.http_address, uri)
            replies = await asyncio.gather(*(session.call(uri, number) for number in range(200)))
            assert [reply.payload for reply in replies] == list(range(200))
            assert await messages_on(almanet_broker.http_address, uri) - before == 200


async def test_a_uri_no_longer_called_is_not_asked_about_again(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check of batches asks only about URIs called lately: a session that called many (orders.<id>.get) does
    not go on asking about them all; a URI called again is asked about as any call after SERVED_FOR does."""
    monkeypatch.setattr(almanet.discovery, "BATCHES_CHECKED_EVERY", 0.3)
    uri = f"{prefix}.echo"
    async with echo_service(almanet_broker.tcp_address, prefix):
        await batching_on(session, uri, "first")
        session._discovery.served_until[uri] = 0.0  # as SERVED_FOR after its last reply
        await eventually(lambda: uri not in session._discovery.batches)
        await asyncio.sleep(0.5)
        assert discovery_over(session)  # no query went out for it
        await batching_on(session, uri, "again")


# --- what is refused ------------------------------------------------------------------


async def test_a_forged_reply_in_a_batch_from_another_nsqd_is_not_taken(
    almanet_broker: BrokerAddresses, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """As tests/test_forged_replies.py: the call id known, the reply must come by the nsqd the call went to."""
    called: list[Any] = []
    with broker_in_thread(tcp_address="127.0.0.1:0", http_address="127.0.0.1:0") as other:
        both = (almanet_broker.tcp_address, other.tcp_address)
        service = almanet.new_service(*both, prefix=prefix)

        @service.procedure
        async def balance(payload: Any) -> None:
            called.append(payload)
            await asyncio.Event().wait()

        uri = f"{prefix}.balance"
        async with service, almanet.new_session(*both) as victim:
            try:
                call = asyncio.ensure_future(victim.call(uri, "victim", timeout=2))
                await eventually(lambda: called and waiting_calls(victim, uri))
                [(call_id, waiting)] = waiting_calls(victim, uri)
                reading = victim._replies
                assert waiting.origin is not None and reading is not None
                await eventually(lambda: len(reading.connections) == 2)  # the reply topic read on both
                elsewhere = next(address for address in both if address != waiting.origin.address)
                forged = encode_batch(
                    [encode_reply(12345, True, "nobody waits"), encode_reply(call_id, True, {"balance": 10**9})]
                )
                async with Producer(elsewhere) as attacker:
                    await attacker.publish(victim.reply_topic, forged)
                await eventually(lambda: f"dropped a reply to call {call_id} from nsqd at {elsewhere}" in caplog.text)
                with pytest.raises(almanet.CallTimeout):
                    await call
            finally:
                await service.stop(timeout=0)


async def test_bad_batches_to_a_procedure_leave_the_service_serving(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="almanet")
    service = echo_service(almanet_broker.tcp_address, prefix)

    @service.procedure
    async def silent(payload: Any) -> None:
        await asyncio.Event().wait()

    uri = f"{prefix}.echo"
    async with service:
        try:
            # Two calls that wait: the invocations crafted for echo carry their call ids, and echo's replies end them.
            waiting = [asyncio.ensure_future(session.call(silent, number, timeout=TIMEOUT)) for number in range(2)]
            await eventually(lambda: len(waiting_calls(session, silent.uri)) == 2)
            (valid_id, valid_call), (broken_id, broken_call) = waiting_calls(session, silent.uri)
            valid = encode_invocation(valid_id, session.reply_topic, 0, None, "valid")
            broken = msgpack.packb([1, 0, broken_id, session.reply_topic, "no deadline", None, "broken"])
            async with Producer(almanet_broker.tcp_address) as producer:
                await producer.publish(uri, encode_batch([valid, valid])[:-3])  # truncated
                await producer.publish(uri, encode_batch([b"not an envelope", msgpack.packb("neither")]))
                await producer.publish(uri, encode_batch([valid, broken]))
            await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), TIMEOUT)
            assert valid_call.future.result().payload == "valid"
            refused = broken_call.future.exception()
            assert isinstance(refused, almanet.InvalidEnvelope), refused
            assert "the deadline must be an unsigned int" in str(refused)
            assert "not a batch of invocations: the batch is truncated" in caplog.text
            assert caplog.text.count(f"{uri}: not an invocation") == 3  # the two items that are none, and broken
            assert (await session.call(uri, "later", timeout=TIMEOUT)).payload == "later"
        finally:
            await service.stop(timeout=0)


# --- what the review of batches found ----------------------------------------------


async def test_an_item_given_back_is_not_run_again_by_any_channel(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str
) -> None:
    """docs/RPC.md: each channel gets every call, once. What a batch brings past max_concurrency on channel "a"
    is held there: published again to the URI's topic, nsqd would copy it to every channel (and "b" would run it
    again, and give back in turn, without end)."""
    runs: dict[str, Counter[int]] = {"a": Counter(), "b": Counter()}
    service_a = almanet.new_service(almanet_broker.tcp_address, prefix=prefix)
    service_b = almanet.new_service(almanet_broker.tcp_address, prefix=prefix)

    @service_a.procedure(name="work", channel="a", max_concurrency=BATCH_ITEMS)
    async def slow(payload: int, **kwargs: Any) -> int:
        runs["a"][payload] += 1
        await asyncio.sleep(0.05)
        return payload

    @service_b.procedure(name="work", channel="b", max_concurrency=4 * BATCH_ITEMS)
    async def fast(payload: int, **kwargs: Any) -> int:
        runs["b"][payload] += 1
        return payload

    uri = f"{prefix}.work"
    async with service_a, service_b:
        await session.call(uri, -1, timeout=TIMEOUT)
        await eventually(lambda: uri in session._discovery.batches)
        await asyncio.sleep(0.2)
        runs["a"].clear()
        runs["b"].clear()
        calls = 8 * BATCH_ITEMS
        await asyncio.wait_for(asyncio.gather(*(session.call(uri, n) for n in range(calls))), TIMEOUT)
        await asyncio.sleep(0.5)  # what channel "a" gave back reaches channel "b" too
    expected = Counter(range(calls))
    again = {channel: sum((counter - expected).values()) for channel, counter in runs.items()}
    assert again == {"a": 0, "b": 0}, f"calls run again: {again}"


async def test_one_busy_instance_does_not_bounce_items_through_nsqd(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str
) -> None:
    """The RDY counts the items of batches: nsqd counts messages, and one instance with max_concurrency 32 would
    be handed all 8 batches of a 256-call burst at once. Each batch is one message to the URI, nothing more."""
    service = almanet.new_service(almanet_broker.tcp_address, prefix=prefix)

    @service.procedure(name="work", max_concurrency=BATCH_ITEMS)
    async def slow(payload: int, **kwargs: Any) -> int:
        await asyncio.sleep(0.05)
        return payload

    uri = f"{prefix}.work"
    async with service:
        await session.call(uri, -1, timeout=TIMEOUT)
        await eventually(lambda: uri in session._discovery.batches)
        before = await messages_on(almanet_broker.http_address, uri)
        calls = 8 * BATCH_ITEMS
        await asyncio.wait_for(asyncio.gather(*(session.call(uri, n) for n in range(calls))), TIMEOUT)
        messages = await messages_on(almanet_broker.http_address, uri) - before
    batches = calls // BATCH_ITEMS
    assert messages <= 2 * batches, f"{messages} NSQ messages to the URI for {calls} calls in {batches} batches"


@dataclasses.dataclass
class Point:
    x: int

    def __post_init__(self) -> None:
        assert self.x >= 0, "negative"  # msgspec lets an AssertionError through (not a ValidationError)


async def test_an_item_whose_payload_check_raises_leaves_its_batch_and_the_rdy_sound(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str
) -> None:
    """An item of a batch whose payload check raises (a payload's __post_init__ assert, which msgspec passes on)
    is refused as InvalidPayload; the others are answered, the batch FINed (never REQ'd while its items ran), and
    the connection's count of the items batches carry goes back to 0: nothing stalls the procedure there."""
    service = almanet.new_service(almanet_broker.tcp_address, prefix=prefix)
    runs: Counter[int] = Counter()

    @service.procedure(name="work", max_concurrency=BATCH_ITEMS)
    async def work(payload: Point) -> int:
        runs[payload.x] += 1
        return payload.x

    uri = f"{prefix}.work"
    async with service:
        await session.call(uri, {"x": 1000}, timeout=TIMEOUT)
        await eventually(lambda: uri in session._discovery.batches)
        runs.clear()
        for _ in range(2):
            payloads = [{"x": n} for n in range(5)] + [{"x": -1}] + [{"x": n} for n in range(5, 20)]
            await asyncio.gather(*(session.call(uri, p, timeout=2) for p in payloads), return_exceptions=True)
        connection = next(iter(service._consumers[0].connections.values()))
        state = {"carried": connection.carried, "in_flight": connection.in_flight, "rdy": connection.ready_count}
        later = await asyncio.gather(
            *(session.call(uri, {"x": n}, timeout=2) for n in range(100, 110)), return_exceptions=True
        )
    assert state["carried"] == state["in_flight"] == 0 and state["rdy"] >= 1, state
    assert runs == Counter({**{n: 2 for n in range(20)}, **{n: 1 for n in range(100, 110)}})  # each valid call once
    assert all(isinstance(o, almanet.Reply) for o in later), [type(o).__name__ for o in later]


async def test_joining_keeps_an_mpub_within_max_body_size(prefix: str) -> None:
    """Publish.encode joins the bodies an MPUB was filled with up to max_body_size; two 2040-byte envelopes in a
    batch take 4094 bytes of MPUB body against 4088 alone: joined, a full MPUB would pass nsqd's --max-body-size
    (E_BAD_BODY, fatal, closing the connection every call and reply goes by), so it goes unjoined."""
    from almanet.broker.nsqd import find_nsqd, nsqd_process

    executable = find_nsqd()
    if executable is None:
        pytest.skip("no nsqd")
    body = 2040  # the invocation envelope of a 1972-byte payload
    calls = 8
    max_body = 4 + calls * (4 + body)  # exactly what 8 such invocations take in one MPUB
    with nsqd_process(executable, f"--max-body-size={max_body}") as (tcp, _http):
        service = almanet.new_service(tcp, prefix=prefix)

        @service.procedure(name="echo", max_concurrency=BATCH_ITEMS)
        async def echo(payload: Any) -> int:
            return len(payload)

        uri = f"{prefix}.echo"
        async with service, almanet.new_session(tcp, max_body_size=max_body) as session:
            await session.call(uri, b"", timeout=TIMEOUT)
            await eventually(lambda: uri in session._discovery.batches)
            payload = b"x" * 1972
            outcomes = await asyncio.gather(
                *(session.call(uri, payload, timeout=5) for _ in range(calls)), return_exceptions=True
            )
    assert all(isinstance(outcome, almanet.Reply) for outcome in outcomes), outcomes


async def test_a_batches_check_that_could_not_be_asked_stops_the_batches(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A check whose query fails (its publish raises, as Consumer.publish does with no connection open, or the
    connection it went by is lost) stops the batches to the URI, to be safe: else they would go on, never checked
    again while calls keep ``served_until`` fresh, and an older instance joining later would not be noticed."""
    uri = f"{prefix}.echo"
    async with echo_service(almanet_broker.tcp_address, prefix):
        await session.call(uri, "first", timeout=TIMEOUT)
        await eventually(lambda: uri in session._discovery.batches)
        discovery = session._discovery
        discovery._checks[uri].cancel()  # the check is due now: run below
        publish_call = session._publish_call

        def no_connection(topic: str, body: bytes, call: Any, join: Any) -> None:
            if topic == DISCOVERY_TOPIC:
                raise ConnectionFailed("no connection to nsqd open")
            publish_call(topic, body, call, join)

        monkeypatch.setattr(session, "_publish_call", no_connection)
        discovery._check_batches(uri)
        await asyncio.sleep(0.1)
        monkeypatch.setattr(session, "_publish_call", publish_call)
        for _ in range(3):  # calls go on, renewing served_until
            await session.call(uri, "again", timeout=TIMEOUT)
        assert uri not in discovery.batches or uri in discovery._checks, "batches go on, never checked again"


async def test_lone_calls_after_batches_bring_the_rdy_back_to_the_share(
    almanet_broker: BrokerAddresses, session: almanet.Session, prefix: str
) -> None:
    """The RDY counts the calls batches carry, at the calls a message lately: lone messages bring that back to
    one, and the RDY to max_concurrency (nothing more done a message from then on)."""
    service = almanet.new_service(almanet_broker.tcp_address, prefix=prefix)

    @service.procedure(name="work", max_concurrency=BATCH_ITEMS)
    async def work(payload: int, **kwargs: Any) -> int:
        await asyncio.sleep(0.001)
        return payload

    uri = f"{prefix}.work"
    async with service:
        await batching_on(session, uri, -1)
        await asyncio.gather(*(session.call(uri, number) for number in range(4 * BATCH_ITEMS)))
        connection = next(iter(service._consumers[0].connections.values()))
        assert connection.items_a_message > 1.0  # batches came
        for number in range(40):
            await session.call(uri, number)
        assert connection.items_a_message == 1.0
        assert connection.ready_count == BATCH_ITEMS
