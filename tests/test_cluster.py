"""almanet on an NSQ cluster: 3 nsqd registering with 2 nsqlookupd (the ``almanet_cluster`` fixture).

A service is given its own host's nsqd and the nsqlookupd; each caller only
its own host's nsqd, as deployed. Skipped where nsqd or nsqlookupd is not
found. The daemons are started and stopped in a thread (``to_thread``): the
service and the callers run in the test's event loop, which must not stall.
Failover between two brokers, and the embedded broker answering as
nsqlookupd, run on either broker; docs/CLUSTER.md's examples run last.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import almanet
from almanet.broker.nsqd import Cluster
from almanet.nsq.lookupd import POLL_INTERVAL
from almanet.pytest_plugin import BrokerAddresses
from helpers import broker_of_kind, channel_stats, eventually, free_port, topic_stats

POLL = 0.5  # the tests' nsqlookupd poll interval, where the test is about a change of the cluster


def cluster_service(cluster: Cluster, prefix: str, node: int = 0, **options: Any) -> almanet.Service:
    """The README's greeting service on nsqd ``node`` and both nsqlookupd."""
    return cluster_service_on(cluster.tcp(node), cluster.lookupd_http, prefix, **options)


def cluster_service_on(nsqd: str, lookupd: list[str], prefix: str, **options: Any) -> almanet.Service:
    """The README's greeting service on ``nsqd`` and the nsqlookupd ``lookupd``."""
    service = almanet.new_service(nsqd, *lookupd, prefix=prefix, **options)

    @service.procedure
    async def greeting(payload: str) -> str:
        return f"Hello, {payload}!"

    return service


@pytest.fixture
async def callers(almanet_cluster: Cluster) -> AsyncIterator[list[almanet.Session]]:
    """A session on each nsqd of the cluster, joined."""
    sessions = [almanet.new_session(almanet_cluster.tcp(node)) for node in range(len(almanet_cluster.nodes))]
    for session in sessions:
        await session.join()
    yield sessions
    for session in sessions:
        await session.leave()


async def outcome(session: almanet.Session, uri: str, timeout: float = 1.0) -> Exception | None:
    """Call ``uri``: None when it is answered as the greeting service answers, else what it raised."""
    try:
        reply = await session.call(uri, "cluster", timeout=timeout)
    except Exception as error:
        return error
    assert reply.payload == "Hello, cluster!"
    return None


async def first_answer(session: almanet.Session, uri: str, within: float) -> tuple[float, collections.Counter[str]]:
    """Call ``uri`` until it is answered: the seconds that took, and the failures before, by name."""
    failures: collections.Counter[str] = collections.Counter()
    started = time.monotonic()
    while (error := await outcome(session, uri)) is not None:
        assert isinstance(error, almanet.NoResponders | TimeoutError | ConnectionError), error
        failures[type(error).__name__] += 1
        if time.monotonic() - started > within:
            raise AssertionError(f"{uri} not answered within {within} s: {dict(failures)}")
        await asyncio.sleep(0.05)
    return time.monotonic() - started, failures


async def test_a_service_answers_callers_on_every_nsqd_once_it_serves(
    almanet_cluster: Cluster, callers: list[almanet.Session], prefix: str
) -> None:
    """No poll to wait for: the service reads every nsqd nsqlookupd lists before it says it serves."""
    async with cluster_service(almanet_cluster, prefix, lookupd_poll_interval=60.0):
        for session in callers:
            took, failures = await first_answer(session, f"{prefix}.greeting", within=2.0)
            assert not failures and took < 2.0
        replies = await asyncio.gather(*(session.call(f"{prefix}.greeting", "cluster") for session in callers * 100))
        assert {reply.payload for reply in replies} == {"Hello, cluster!"}


async def test_calls_in_batches_on_every_nsqd_are_answered_through_the_nsqd_they_went_to(
    almanet_cluster: Cluster, callers: list[almanet.Session], prefix: str
) -> None:
    """A caller on each nsqd batches its calls; each batch of replies comes back by the nsqd its calls went to."""
    uri = f"{prefix}.greeting"
    async with cluster_service(almanet_cluster, prefix, lookupd_poll_interval=60.0):
        for session in callers:
            await first_answer(session, uri, within=2.0)
        await eventually(lambda: all(uri in session._discovery.batches for session in callers))
        before = [await topic_stats(almanet_cluster.http(node), uri) for node in range(len(callers))]
        names = [f"n{number}" for number in range(300)]
        for session in callers:
            replies = await asyncio.gather(*(session.call(uri, name) for name in names))
            assert [reply.payload for reply in replies] == [f"Hello, {name}!" for name in names]
        for node, stats in enumerate(before):
            after = await topic_stats(almanet_cluster.http(node), uri)
            assert stats is not None and after is not None
            assert after["message_count"] - stats["message_count"] < 300 / 2  # in batches, on that nsqd


async def test_an_nsqd_that_joins_is_served_within_a_poll(almanet_cluster: Cluster, prefix: str) -> None:
    """A caller given only its nsqd hears of no service until one reads there; one also given nsqlookupd waits."""
    uri = f"{prefix}.greeting"
    async with cluster_service(almanet_cluster, prefix, lookupd_poll_interval=2.0):
        node = await asyncio.to_thread(almanet_cluster.add_node)  # returns once nsqlookupd lists it
        async with almanet.new_session(almanet_cluster.tcp(node)) as session:
            took, failures = await first_answer(session, uri, within=10.0)
            assert took < 2.0 * 1.1 + 2.0 and set(failures) <= {"NoResponders"}
        node = await asyncio.to_thread(almanet_cluster.add_node)
        started = time.monotonic()
        async with almanet.new_session(almanet_cluster.tcp(node), *almanet_cluster.lookupd_http) as session:
            assert await outcome(session, uri, timeout=10.0) is None
            assert time.monotonic() - started < 2.0 * 1.1 + 2.0


async def test_no_responders_keeps_its_meaning_for_a_caller_given_nsqlookupd(
    almanet_cluster: Cluster, prefix: str
) -> None:
    """Nothing in the cluster serves the URI, or its services left every nsqd: NoResponders within a second."""
    async with almanet.new_session(almanet_cluster.tcp(1), *almanet_cluster.lookupd_http) as session:
        for uri in (f"{prefix}.nothing", f"{prefix}.greeting"):
            if uri.endswith("greeting"):
                async with cluster_service(almanet_cluster, prefix):
                    assert await outcome(session, uri) is None
                session._discovery.served_until.clear()  # as SERVED_FOR after the last reply: the session asks again
            started = time.monotonic()
            with pytest.raises(almanet.NoResponders):
                await session.call(uri, "cluster")
            assert time.monotonic() - started < 1.5


async def test_an_nsqd_that_dies_is_dropped_without_disturbing_the_rest(
    almanet_cluster: Cluster, callers: list[almanet.Session], prefix: str
) -> None:
    uri = f"{prefix}.greeting"
    async with cluster_service(almanet_cluster, prefix, lookupd_poll_interval=POLL) as service:
        await asyncio.gather(*(session.call(uri, "cluster") for session in callers))
        stop = asyncio.Event()
        answered: collections.Counter[int] = collections.Counter()
        failed: list[BaseException] = []

        async def keep_calling(node: int) -> None:
            while not stop.is_set():
                error = await outcome(callers[node], uri, timeout=5.0)
                if error is None:
                    answered[node] += 1
                else:
                    failed.append(error)

        calling = [asyncio.ensure_future(keep_calling(node)) for node in (0, 2)]
        await asyncio.sleep(0.3)
        await asyncio.to_thread(almanet_cluster.kill_node, 1)
        before = dict(answered)
        await asyncio.sleep(POLL * 3)
        stop.set()
        await asyncio.gather(*calling)
        assert not failed
        assert all(answered[node] > before[node] for node in (0, 2))
        await eventually(lambda: all(almanet_cluster.tcp(1) not in c.connections for c in service._consumers))


async def test_one_nsqlookupd_down_changes_nothing_and_none_keeps_the_last_known(
    almanet_cluster: Cluster, callers: list[almanet.Session], prefix: str
) -> None:
    uri = f"{prefix}.greeting"
    async with cluster_service(almanet_cluster, prefix, lookupd_poll_interval=POLL):
        await asyncio.to_thread(almanet_cluster.lookupds[0].kill)
        node = await asyncio.to_thread(almanet_cluster.add_node)  # registered with the other one
        async with almanet.new_session(almanet_cluster.tcp(node)) as session:
            await first_answer(session, uri, within=10.0)
        await asyncio.to_thread(almanet_cluster.lookupds[1].kill)
        await asyncio.sleep(POLL * 3)
        for session in callers:
            assert (await session.call(uri, "cluster")).payload == "Hello, cluster!"


async def test_a_caller_fails_over_to_its_next_nsqd_and_returns_to_the_first(
    almanet_cluster: Cluster, prefix: str
) -> None:
    uri = f"{prefix}.greeting"
    async with (
        cluster_service(almanet_cluster, prefix, node=2, lookupd_poll_interval=POLL),
        almanet.new_session(almanet_cluster.tcp(0), almanet_cluster.tcp(1)) as session,
    ):
        await session.call(uri, "cluster")
        assert session._calls.connection is not None
        assert session._calls.connection.address == almanet_cluster.tcp(0)
        await asyncio.to_thread(almanet_cluster.kill_node, 0)
        took, _ = await first_answer(session, uri, within=2.0)
        assert took < 2.0 and session._calls.connection.address == almanet_cluster.tcp(1)
        await asyncio.to_thread(almanet_cluster.start_node, 0)

        async def back_on_the_first() -> bool:
            await session.call(uri, "cluster")
            return session._calls.connection is not None and session._calls.connection.address == almanet_cluster.tcp(0)

        deadline = time.monotonic() + 10.0
        while not await back_on_the_first():
            assert time.monotonic() < deadline, "calls did not return to the first nsqd"
            await asyncio.sleep(0.1)
        assert (await topic_stats(almanet_cluster.http(0), uri)) is not None


async def test_calls_in_flight_through_a_lost_nsqd_fail_at_once_and_the_others_go_on(
    almanet_cluster: Cluster, prefix: str
) -> None:
    """Calls through the first nsqd, small and over 16 KiB (published apart), fail at once when it is lost."""
    uri = f"{prefix}.slow"
    service = almanet.new_service(almanet_cluster.tcp(2), *almanet_cluster.lookupd_http, prefix=prefix)

    @service.procedure
    async def slow(payload: list[Any]) -> float:
        await asyncio.sleep(payload[0])
        return float(payload[0])

    async with service, almanet.new_session(almanet_cluster.tcp(0), almanet_cluster.tcp(1)) as session:
        await session.call(uri, [0.0, ""])
        small = asyncio.ensure_future(session.call(uri, [30.0, ""], timeout=30.0))
        big = asyncio.ensure_future(session.call(uri, [30.0, "x" * 20_000], timeout=30.0))
        await asyncio.sleep(0.3)
        await asyncio.to_thread(almanet_cluster.kill_node, 0)
        started = time.monotonic()
        for call in (small, big):
            with pytest.raises(ConnectionError):
                await call
        assert time.monotonic() - started < 1.0
        assert (await session.call(uri, [0.1, ""])).payload == 0.1


async def test_max_concurrency_below_the_number_of_nsqd_still_answers_every_nsqd_at_once(
    almanet_cluster: Cluster, callers: list[almanet.Session], prefix: str
) -> None:
    """Every nsqd may hand out an invocation (RDY 1 each); the service runs one at a time, holding the others."""
    service = almanet.new_service(almanet_cluster.tcp(0), *almanet_cluster.lookupd_http, prefix=prefix)
    running, most = 0, 0

    @service.procedure(max_concurrency=1)
    async def one_at_a_time(payload: int) -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.05)
        running -= 1
        return payload

    async with service:
        started = time.monotonic()
        calls = [session.call(f"{prefix}.one_at_a_time", number) for number in range(4) for session in callers]
        replies = await asyncio.gather(*calls)
        assert sorted(reply.payload for reply in replies) == sorted(list(range(4)) * 3)
        assert most == 1
        assert time.monotonic() - started < 3.0  # 12 calls of 50 ms one after another, not a 5 s RDY rotation


async def test_multicall_is_answered_once_by_each_channel_wherever_it_is_published(
    almanet_cluster: Cluster, callers: list[almanet.Session], prefix: str
) -> None:
    services = []
    for node, channel in ((0, "a"), (1, "a"), (2, "b")):  # two instances on channel a, one on b
        service = almanet.new_service(almanet_cluster.tcp(node), *almanet_cluster.lookupd_http, prefix=prefix)

        @service.procedure(channel=channel)
        async def greeting(payload: str, answer: str = channel) -> str:
            return answer

        services.append(service)
    for service in services:
        await service.start()
    try:
        for session in callers:
            replies = await session.multicall(f"{prefix}.greeting", "who", timeout=1.0)
            assert sorted(reply.payload for reply in replies) == ["a", "b"]  # type: ignore[union-attr]
    finally:
        for service in services:
            await service.stop()


async def test_a_big_reply_comes_back_through_the_callers_nsqd(
    almanet_cluster: Cluster, callers: list[almanet.Session], prefix: str
) -> None:
    """Replies over APART_SIZE go apart from the others: to the nsqd the caller reads, still."""
    service = almanet.new_service(almanet_cluster.tcp(0), *almanet_cluster.lookupd_http, prefix=prefix)

    @service.procedure
    async def big(payload: int) -> str:
        return "x" * payload

    async with service:
        for session in callers:
            assert len((await session.call(f"{prefix}.big", 100_000)).payload) == 100_000


async def test_consume_through_nsqlookupd_gets_what_every_nsqd_has_across_a_restart(
    almanet_cluster: Cluster, topic: str
) -> None:
    """At least once: what nsqd acknowledged is consumed, an nsqd stopped (SIGTERM) and started again included."""
    producers = [almanet.new_session(almanet_cluster.tcp(node)) for node in (0, 1)]
    for producer in producers:
        await producer.join()
    sent = [f"m{number}" for number in range(300)]
    await asyncio.gather(*(producers[number % 2].produce(topic, body) for number, body in enumerate(sent[:200])))
    received: collections.Counter[str] = collections.Counter()
    consumer = almanet.new_session(almanet_cluster.tcp(2), *almanet_cluster.lookupd_http)
    subscription = consumer.consume(topic, "all", max_in_flight=2, lookupd_poll_interval=POLL)
    async with consumer, subscription as messages:

        async def read() -> None:
            async for message in messages:
                received[message.payload] += 1
                message.commit()
                await asyncio.sleep(0.002)  # slow enough that nsqd 0 still holds messages when it stops

        reading = asyncio.ensure_future(read())
        await eventually(lambda: len(received) >= 20)
        await producers[0].leave()
        held = await channel_stats(almanet_cluster.http(0), topic, "all")
        assert held is not None and held["depth"] > 0
        await asyncio.to_thread(almanet_cluster.stop_node, 0)  # with what it holds unread
        await asyncio.gather(*(producers[1].produce(topic, body) for body in sent[200:250]))
        await asyncio.to_thread(almanet_cluster.start_node, 0)
        producers[0] = almanet.new_session(almanet_cluster.tcp(0))
        await producers[0].join()
        await asyncio.gather(*(producers[0].produce(topic, body) for body in sent[250:]))
        await eventually(lambda: set(received) == set(sent), timeout=20.0)
        reading.cancel()
    for producer in producers:
        await producer.leave()


async def test_a_caller_given_nsqlookupd_waits_in_vain_once_for_a_uri_whose_services_are_gone(
    almanet_cluster: Cluster, prefix: str
) -> None:
    """Topics outlive their services: on an nsqd that joined since, the first call waits two polls, later ones not."""
    uri = f"{prefix}.greeting"
    async with cluster_service(almanet_cluster, prefix):
        pass  # its topics stay on the three nsqd
    node = await asyncio.to_thread(almanet_cluster.add_node)
    session = almanet.new_session(almanet_cluster.tcp(node), *almanet_cluster.lookupd_http, lookupd_poll_interval=0.5)
    async with session:
        # Two polls and the discovery waits around them; then a discovery wait alone.
        for most, said in ((1.0 + 3 * 0.75, "no service there came to this nsqd"), (1.0, "no service answered")):
            started = time.monotonic()
            with pytest.raises(almanet.NoResponders, match=said):
                await session.call(uri, "cluster")
            assert time.monotonic() - started < most


async def test_almanet_serve_on_a_cluster_takes_the_poll_interval_flag(
    almanet_cluster: Cluster, prefix: str, tmp_path: Path
) -> None:
    (tmp_path / "app.py").write_text(
        "import almanet\n"
        f"service = almanet.new_service('127.0.0.1:4150', prefix={prefix!r})\n"
        "@service.procedure\n"
        "async def greeting(payload: str) -> str:\n"
        "    return f'Hello, {payload}!'\n"
    )
    addresses = [flag for address in (almanet_cluster.tcp(0), *almanet_cluster.lookupd_http)
                 for flag in ("--address", address)]  # fmt: skip
    command = [sys.executable, "-m", "almanet", "serve", "app:service", *addresses]
    refused = subprocess.run([*command, "--lookupd-poll-interval", "0"], cwd=tmp_path, capture_output=True, text=True)
    assert refused.returncode == 2 and "must be a number above 0, not 0" in refused.stderr
    serving = subprocess.Popen(
        [*command, "--lookupd-poll-interval", "0.5"], cwd=tmp_path, stderr=subprocess.PIPE, text=True
    )
    try:
        assert serving.stderr is not None
        line = "-"
        while " serving " not in line:
            line = await asyncio.to_thread(serving.stderr.readline)
            assert line, "almanet serve ended before it served"
        nodes = ", ".join(sorted(almanet_cluster.tcp(node) for node in range(3)))
        assert f"serving {prefix}.greeting (channel rpc) on " in line and f"(reading from 3 nsqd: {nodes})" in line
        threading.Thread(target=serving.stderr.read, daemon=True).start()
        node = await asyncio.to_thread(almanet_cluster.add_node)
        async with almanet.new_session(almanet_cluster.tcp(node)) as session:
            took, _ = await first_answer(session, f"{prefix}.greeting", within=10.0)
        assert took < 0.5 * 1.1 + 2.0  # not the default 5 s
    finally:
        serving.terminate()
        assert serving.wait(timeout=30) == 0


# --- on either broker ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["embedded", "nsqd"])
async def test_a_caller_fails_over_and_returns_on_either_broker(kind: str, prefix: str) -> None:
    """Two brokers of a kind, no nsqlookupd: the service reads both, the caller prefers the first."""
    uri = f"{prefix}.greeting"
    first_address = f"127.0.0.1:{free_port()}"
    first = contextlib.ExitStack()
    await asyncio.to_thread(first.enter_context, broker_of_kind(kind, first_address))
    try:
        with broker_of_kind(kind) as second:
            service = almanet.new_service(first_address, second, prefix=prefix)

            @service.procedure
            async def greeting(payload: str) -> str:
                return f"Hello, {payload}!"

            async with service, almanet.new_session(first_address, second) as session:
                assert await outcome(session, uri) is None
                assert session._calls.connection is not None and session._calls.connection.address == first_address
                await asyncio.to_thread(first.close)
                took, _ = await first_answer(session, uri, within=2.0)
                assert took < 2.0 and session._calls.connection.address == second
                await asyncio.to_thread(first.enter_context, broker_of_kind(kind, first_address))
                deadline = time.monotonic() + 10.0
                while session._calls.connection.address != first_address:
                    assert time.monotonic() < deadline, "calls did not return to the first broker"
                    assert await outcome(session, uri) is None
                    await asyncio.sleep(0.1)
    finally:
        await asyncio.to_thread(first.close)


async def test_a_service_given_the_embedded_brokers_lookupd_reads_the_nodes_it_lists(
    embedded: BrokerAddresses, prefix: str
) -> None:
    """The embedded broker answers /nodes as nsqlookupd with itself alone, so the same code runs without nsqd."""
    service = cluster_service_on(embedded.tcp_address, [f"http://{embedded.http_address}"], prefix)
    async with service, almanet.new_session(embedded.tcp_address) as session:
        assert service._nsqd_watch is not None and service._nsqd_watch.known == {embedded.tcp_address}
        assert await outcome(session, f"{prefix}.greeting") is None


def test_the_poll_interval_is_a_positive_number_of_seconds(tcp: str) -> None:
    for interval in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="lookupd_poll_interval"):
            almanet.new_session(tcp, lookupd_poll_interval=interval)
    assert almanet.new_service(tcp, lookupd_poll_interval=0.25).session.lookupd_poll_interval == 0.25
    assert almanet.new_session(tcp).lookupd_poll_interval == POLL_INTERVAL


# --- docs/CLUSTER.md ----------------------------------------------------------------------

CLUSTER_DOC = Path(__file__).resolve().parent.parent / "docs" / "CLUSTER.md"


def on_the_cluster(block: str, cluster: Cluster) -> str:
    """A block of docs/CLUSTER.md with the test cluster's addresses for the ones it is written with."""
    for node, written in enumerate(("127.0.0.1:4150", "127.0.0.1:4250", "127.0.0.1:4350")):
        block = block.replace(written, cluster.tcp(node))
    for lookupd, written in zip(cluster.lookupd_http, ("http://127.0.0.1:4161", "http://127.0.0.1:4261"), strict=True):
        block = block.replace(written, lookupd)
    return block


def test_the_cluster_page_runs_as_written(almanet_cluster: Cluster, tmp_path: Path) -> None:
    """The service on host 1, then the callers on hosts 2 and 3, then produce and consume: each prints what it says."""
    text = CLUSTER_DOC.read_text()
    service, caller, orders = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    for name, block in (("service.py", service), ("caller.py", caller), ("orders.py", orders)):
        (tmp_path / name).write_text(on_the_cluster(block, almanet_cluster))
    serving = subprocess.Popen([sys.executable, "service.py"], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        assert serving.stderr is not None
        for line in serving.stderr:
            if "serving net.example.greeting" in line:
                break
        threading.Thread(target=serving.stderr.read, daemon=True).start()  # never blocked writing its log
        for name, block in (("caller.py", caller), ("orders.py", orders)):
            done = subprocess.run(
                [sys.executable, name], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True
            )
            assert done.stdout.splitlines() == re.findall(r"^# (.+)$", block, re.MULTILINE)
    finally:
        serving.terminate()
        assert serving.wait(timeout=30) == 0
