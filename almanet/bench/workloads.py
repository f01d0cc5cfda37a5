"""The measured workloads, for almanet, NATS (nats-py) and the RPC baseline (ansq).

Each ``measure_*`` coroutine runs in a client process of its own (see
``workers``), against a broker and, for RPC, a service in other processes,
and returns its figures: ``latencies_us`` (sequential RPC) or ``per_second``.
The same workload shapes serve every system: sequential calls, calls with a
window in flight, publishes with a window in flight, and consuming.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

RPC_PAYLOAD = b"x" * 100
MESSAGE_BODY = b"x" * 200
BATCH = 200
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


async def rpc(call: Callable[[], Awaitable[Any]], count: int, window: int) -> dict[str, Any]:
    await windowed(call, min(count, 1000), window)  # warm-up: connections, caches, the service's JIT of nothing
    if window == 1:
        return {"latencies_us": await sequential(call, count)}
    return {"per_second": count / await windowed(call, count, window)}


# --- almanet ---------------------------------------------------------------------------


async def almanet_rpc(address: str, name: str, count: int, window: int) -> dict[str, Any]:
    import almanet

    async with almanet.new_session(address) as session:
        uri = f"{name}.echo"
        return await rpc(lambda: session.call(uri, RPC_PAYLOAD), count, window)


async def almanet_publish(address: str, name: str, count: int, window: int) -> dict[str, Any]:
    import almanet

    async with almanet.new_session(address) as session:
        if window:
            elapsed = await windowed(lambda: session.produce(name, MESSAGE_BODY), count, window)
        else:
            started = time.perf_counter()
            await produce_in_batches(session, name, count)
            elapsed = time.perf_counter() - started
    return {"per_second": count / elapsed}


async def produce_in_batches(session: Any, topic: str, count: int) -> None:
    """``count`` messages in MPUBs of BATCH (the last one smaller)."""
    for start in range(0, count, BATCH):
        await session.produce_batch(topic, [MESSAGE_BODY] * min(BATCH, count - start))


async def almanet_consume(address: str, name: str, count: int, window: int) -> dict[str, Any]:
    import almanet

    async with almanet.new_session(address) as session:
        # Waiting in the topic before the clock starts; subscribing, the first thing timed, gives them a channel.
        await produce_in_batches(session, name, count)
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


# --- NATS (nats-py, core NATS) --------------------------------------------------------------


async def nats_rpc(address: str, name: str, count: int, window: int) -> dict[str, Any]:
    import nats

    client = await nats.connect(f"nats://{address}")
    try:
        return await rpc(lambda: client.request(name, RPC_PAYLOAD, timeout=30), count, window)
    finally:
        await client.close()


async def nats_publish(address: str, name: str, count: int, window: int) -> dict[str, Any]:
    import nats

    client = await nats.connect(f"nats://{address}")
    try:
        started = time.perf_counter()
        await windowed(lambda: client.publish(name, MESSAGE_BODY), count, window)
        await client.flush()
        elapsed = time.perf_counter() - started
    finally:
        await client.close()
    return {"per_second": count / elapsed}


async def nats_consume(address: str, name: str, count: int, window: int) -> dict[str, Any]:
    """A core subscription receiving ``count`` messages that another process publishes as fast as it can."""
    import nats

    from almanet.bench.workers import publisher_process

    client = await nats.connect(f"nats://{address}")
    received = 0
    done = asyncio.get_running_loop().create_future()
    started = 0.0

    async def on_message(message: Any) -> None:
        nonlocal received, started
        if not received:
            started = time.perf_counter()
        received += 1
        if received == count:
            done.set_result(time.perf_counter())

    try:
        await client.subscribe(name, cb=on_message, pending_msgs_limit=count + 1, pending_bytes_limit=-1)
        await client.flush()
        with publisher_process("nats", address, name, count):
            finished = await asyncio.wait_for(done, TIMEOUT)
    finally:
        await client.close()
    return {"per_second": (count - 1) / (finished - started)}  # from the first message to the last


# --- the RPC baseline (ansq, JSON, a future per call id) ---------------------------------------


async def baseline_rpc(address: str, name: str, count: int, window: int) -> dict[str, Any]:
    from almanet.bench.baseline import BaselineCaller

    async with BaselineCaller(address) as caller:
        text_payload = RPC_PAYLOAD.decode()  # JSON has no bytes
        return await rpc(lambda: caller.call(name, text_payload), count, window)


MEASURES: dict[tuple[str, str], Callable[[str, str, int, int], Awaitable[dict[str, Any]]]] = {
    ("almanet", "rpc"): almanet_rpc,
    ("almanet", "publish"): almanet_publish,
    ("almanet", "consume"): almanet_consume,
    ("nats", "rpc"): nats_rpc,
    ("nats", "publish"): nats_publish,
    ("nats", "consume"): nats_consume,
    ("baseline", "rpc"): baseline_rpc,
}
