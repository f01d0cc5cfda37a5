"""The measured workloads, for almanet, NATS request/reply (nats-py) and NATS JetStream.

Each ``MEASURES`` coroutine runs in a client process of its own (see
``workers``), against a broker and, for RPC, a service in other processes,
and returns its figures as JSON: ``latencies_us`` (sequential RPC),
``sequential_s`` and ``concurrent_s`` (the stress bar) or ``per_second``.
Every one takes ``(address, name, count, window, size, mark)``: ``name`` is
the topic, subject or service prefix of its own, ``window`` how many calls or
publishes are in flight (the most messages in flight for consumers), ``size``
the payload's bytes. The RPC workloads (``rpc``, ``stress``), NATS's as
almanet's, await ``mark()`` where their measured calls start and end, after
their warm-up and before they leave: the harness reads other processes' CPU
time there (``workers.measure``). ``almanet_rpc_under_load`` is RPC in one
of several callers measured together (``workers.rpc_under_load``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

BATCH = 200  # messages per produce_batch()
STRESS_CALLS = 256  # the original almanet's stress bar: this many calls one after the other, then at once, each < 1 s
WARM_UP_S = 1.0  # RPC's warm-up lasts this long at least (almanet.rpc.DISCOVERY_WAIT is 0.75 s)
# No workload waits longer than this for what it expects.
TIMEOUT = 300.0


async def sequential(call: Callable[[], Awaitable[Any]], count: int) -> list[float]:
    """Latency of ``count`` calls one after the other, in microseconds."""
    latencies = []
    clock = time.perf_counter
    for _ in range(count):
        started = clock()
        await call()
        latencies.append((clock() - started) * 1e6)
    return latencies


async def windowed(call: Callable[[], Awaitable[Any]], count: int, window: int) -> float:
    """Seconds for ``count`` calls with ``window`` of them in flight at any time."""

    async def worker(calls: int) -> None:
        for _ in range(calls):
            await call()

    share, extra = divmod(count, window)
    started = time.perf_counter()
    await asyncio.gather(*(worker(share + (index < extra)) for index in range(window)))
    return time.perf_counter() - started


def timed(call: Callable[[], Awaitable[Any]], latencies: list[float]) -> Callable[[], Awaitable[None]]:
    """``call``, adding the latency of each call to ``latencies``, in microseconds."""
    clock = time.perf_counter

    async def timed_call() -> None:
        started = clock()
        await call()
        latencies.append((clock() - started) * 1e6)

    return timed_call


Mark = Callable[[], Awaitable[None]]  # where measured calls start, or end (a span between two marks)


async def warm_up(call: Callable[[], Awaitable[Any]], count: int, window: int) -> int:
    """Calls, ``window`` in flight, until ``min(count, 1000)`` were made and ``WARM_UP_S`` passed; how many.

    Connections, reply subscriptions and caches are in place after it, and
    what an almanet session learns from discovery's answers (whether its
    calls go in batches, after ``DISCOVERY_WAIT``): the measured calls are
    the steady state of a session, as a service's caller lives in.
    """
    started = time.perf_counter()
    made = min(count, 1000)
    await windowed(call, made, window)
    while time.perf_counter() - started < WARM_UP_S:
        await windowed(call, window, window)
        made += window
    return made


async def rpc(call: Callable[[], Awaitable[Any]], count: int, window: int, mark: Mark) -> dict[str, Any]:
    """A warm-up, then ``count`` calls, ``window`` in flight: one span between two marks."""
    warm_up_calls = await warm_up(call, count, window)
    await mark()
    if window == 1:
        figures: dict[str, Any] = {"latencies_us": await sequential(call, count)}
    else:
        figures = {"per_second": count / await windowed(call, count, window)}
    await mark()
    return {**figures, "warm_up_calls": warm_up_calls}


async def rpc_under_load(
    call: Callable[[], Awaitable[Any]], count: int, window: int, go: Callable[[], Awaitable[None]]
) -> dict[str, Any]:
    """A warm-up, then ``count`` calls, ``window`` in flight, once ``go`` returns.

    Its figures: ``latencies_us`` of every call, and ``started`` and ``ended``,
    by ``time.time()``, which other processes' clocks agree with.
    """
    await warm_up(call, count, window)
    await go()
    latencies: list[float] = []
    started = time.time()
    await windowed(timed(call, latencies), count, window)
    return {"latencies_us": latencies, "started": started, "ended": time.time()}


async def stress(call: Callable[[], Awaitable[Any]], mark: Mark) -> dict[str, Any]:
    """Seconds for STRESS_CALLS calls one after the other, then for as many started at once: two spans."""
    await call()  # as the original test did: one call first
    await mark()
    started = time.perf_counter()
    for _ in range(STRESS_CALLS):
        await call()
    sequential_s = time.perf_counter() - started
    await mark()
    started = time.perf_counter()
    await asyncio.gather(*(call() for _ in range(STRESS_CALLS)))
    concurrent_s = time.perf_counter() - started
    await mark()
    return {"sequential_s": sequential_s, "concurrent_s": concurrent_s}


# --- almanet ---------------------------------------------------------------------------


async def almanet_rpc(address: str, name: str, count: int, window: int, size: int, mark: Mark) -> dict[str, Any]:
    import almanet

    async with almanet.new_session(address) as session:
        uri, payload = f"{name}.echo", b"x" * size
        return await rpc(lambda: session.call(uri, payload), count, window, mark)


async def almanet_rpc_under_load(
    address: str,
    name: str,
    count: int,
    window: int,
    size: int,
    go: Callable[[], Awaitable[None]],
    report: Callable[[dict[str, Any]], Awaitable[None]],
) -> None:
    """``rpc_under_load`` on a session that leaves once ``report`` returns: its leaving is not measured."""
    import almanet

    async with almanet.new_session(address) as session:
        uri, payload = f"{name}.echo", b"x" * size
        await report(await rpc_under_load(lambda: session.call(uri, payload), count, window, go))


async def almanet_stress(address: str, name: str, count: int, window: int, size: int, mark: Mark) -> dict[str, Any]:
    import almanet

    async with almanet.new_session(address) as session:
        uri, payload = f"{name}.echo", b"x" * size
        return await stress(lambda: session.call(uri, payload), mark)


async def almanet_publish(address: str, name: str, count: int, window: int, size: int, mark: Mark) -> dict[str, Any]:
    import almanet

    async with almanet.new_session(address) as session:
        body = b"x" * size
        elapsed = await windowed(lambda: session.produce(name, body, raw=True), count, window)
    return {"per_second": count / elapsed}


async def almanet_publish_batches(
    address: str, name: str, count: int, window: int, size: int, mark: Mark
) -> dict[str, Any]:
    import almanet

    async with almanet.new_session(address) as session:
        started = time.perf_counter()
        await produce_in_batches(session, name, count, b"x" * size)
        elapsed = time.perf_counter() - started
    return {"per_second": count / elapsed}


async def produce_in_batches(session: Any, topic: str, count: int, body: bytes) -> None:
    """``count`` messages in MPUBs of BATCH (the last one smaller)."""
    for start in range(0, count, BATCH):
        await session.produce_batch(topic, [body] * min(BATCH, count - start), raw=True)


async def almanet_consume(address: str, name: str, count: int, window: int, size: int, mark: Mark) -> dict[str, Any]:
    import almanet

    async with almanet.new_session(address) as session:
        # Waiting in the topic before the clock starts; subscribing, the first thing timed, gives them a channel.
        await produce_in_batches(session, name, count, b"x" * size)
        messages = session.consume(name, "bench", max_in_flight=window)

        async def consume_all() -> None:
            received = 0
            async for message in messages:
                message.commit()
                received += 1
                if received == count:
                    break

        started = time.perf_counter()
        await asyncio.wait_for(consume_all(), TIMEOUT)
        elapsed = time.perf_counter() - started
        await messages.stop()
    return {"per_second": count / elapsed}


# --- NATS: core request/reply, and JetStream (file storage) ------------------------------------


async def nats_rpc(address: str, name: str, count: int, window: int, size: int, mark: Mark) -> dict[str, Any]:
    import nats

    client = await nats.connect(f"nats://{address}")
    try:
        payload = b"x" * size
        return await rpc(lambda: client.request(name, payload, timeout=30), count, window, mark)
    finally:
        await client.close()


async def nats_stress(address: str, name: str, count: int, window: int, size: int, mark: Mark) -> dict[str, Any]:
    import nats

    client = await nats.connect(f"nats://{address}")
    try:
        payload = b"x" * size
        return await stress(lambda: client.request(name, payload, timeout=30), mark)
    finally:
        await client.close()


async def jetstream_publish(address: str, name: str, count: int, window: int, size: int, mark: Mark) -> dict[str, Any]:
    """Publishes each acknowledged by the stream, ``window`` of them in flight."""
    import nats

    client = await nats.connect(f"nats://{address}")
    stream = _stream_name(name)
    try:
        jetstream = client.jetstream()
        await jetstream.add_stream(name=stream, subjects=[name])
        body = b"x" * size
        elapsed = await windowed(lambda: jetstream.publish(name, body, timeout=30), count, window)
        await jetstream.delete_stream(stream)
    finally:
        await client.close()
    return {"per_second": count / elapsed}


async def jetstream_consume(address: str, name: str, count: int, window: int, size: int, mark: Mark) -> dict[str, Any]:
    """A durable pull consumer fetching ``window`` messages at a time and acknowledging each."""
    import nats
    from nats.js.api import ConsumerConfig

    client = await nats.connect(f"nats://{address}")
    stream = _stream_name(name)
    try:
        jetstream = client.jetstream()
        await jetstream.add_stream(name=stream, subjects=[name])
        # Stored before the clock starts, as for almanet.
        body = b"x" * size
        for _ in range(count):
            await jetstream.publish_async(name, body)
        await jetstream.publish_async_completed()

        async def consume_all() -> None:
            # Acknowledgements outstanding never stop the fetches, as RDY counts only unanswered messages in NSQ.
            subscription = await jetstream.pull_subscribe(
                name, durable="bench", stream=stream, config=ConsumerConfig(max_ack_pending=-1)
            )
            received = 0
            while received < count:
                for message in await subscription.fetch(min(window, count - received), timeout=TIMEOUT):
                    await message.ack()
                    received += 1

        started = time.perf_counter()
        await asyncio.wait_for(consume_all(), TIMEOUT)
        elapsed = time.perf_counter() - started
        await jetstream.delete_stream(stream)
    finally:
        await client.close()
    return {"per_second": count / elapsed}


def _stream_name(subject: str) -> str:
    """A stream name for ``subject`` (stream names have no dots)."""
    return subject.replace(".", "_")


Measure = Callable[[str, str, int, int, int, Mark], Awaitable[dict[str, Any]]]

MEASURES: dict[tuple[str, str], Measure] = {
    ("almanet", "rpc"): almanet_rpc,
    ("almanet", "stress"): almanet_stress,
    ("almanet", "publish"): almanet_publish,
    ("almanet", "publish_batches"): almanet_publish_batches,
    ("almanet", "consume"): almanet_consume,
    ("nats", "rpc"): nats_rpc,
    ("nats", "stress"): nats_stress,
    ("jetstream", "publish"): jetstream_publish,
    ("jetstream", "consume"): jetstream_consume,
}
