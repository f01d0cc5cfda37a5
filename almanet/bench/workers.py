"""Benchmark processes: ``python -m almanet.bench.workers ROLE SYSTEM ADDRESS NAME [COUNT WINDOW]``.

- ``serve SYSTEM ADDRESS NAME``: almanet's service (procedure ``NAME.echo``),
  the baseline's (topic ``NAME``) or a NATS responder (subject ``NAME``);
  prints ``ready`` once subscribed, serves until SIGTERM or SIGINT.
- ``measure SYSTEM WORKLOAD ADDRESS NAME COUNT WINDOW``: one workload of
  ``workloads``; prints its figures as one JSON line.
- ``publish nats ADDRESS NAME COUNT``: publishes COUNT messages to NATS as
  fast as it can (the other side of the NATS consume workload).

``ALMANET_BENCH_LOOP=uvloop`` runs the process on uvloop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import IO, Any

from almanet import loops
from almanet.bench import workloads


def run_loop(main: Coroutine[Any, Any, Any]) -> Any:
    """Run ``main`` on the loop ALMANET_BENCH_LOOP names (asyncio by default)."""
    return loops.run(main, "uvloop" if os.environ.get("ALMANET_BENCH_LOOP") == "uvloop" else "asyncio")


async def _serve(system: str, address: str, name: str) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signal_number, stop.set)
    if system == "almanet":
        import almanet

        service = almanet.new_service(address, prefix=name)

        @service.procedure
        async def echo(payload: Any) -> Any:
            return payload

        async with service:
            print("ready", flush=True)
            await stop.wait()
    elif system == "nats":
        import nats

        client = await nats.connect(f"nats://{address}")

        async def respond(message: Any) -> None:
            await message.respond(message.data)

        await client.subscribe(name, cb=respond)
        await client.flush()
        print("ready", flush=True)
        await stop.wait()
        await client.close()
    else:
        from almanet.bench import baseline

        ready = asyncio.Event()
        serving = asyncio.ensure_future(baseline.serve(address, name, ready, stop))
        await ready.wait()
        print("ready", flush=True)
        await serving


async def _publish_to_nats(address: str, name: str, count: int) -> None:
    import nats

    client = await nats.connect(f"nats://{address}")
    body = workloads.MESSAGE_BODY
    for _ in range(count):
        await client.publish(name, body)
    await client.flush()
    await client.close()


async def _measure(system: str, workload: str, address: str, name: str, count: int, window: int) -> None:
    figures = await workloads.MEASURES[system, workload](address, name, count, window)
    print(json.dumps(figures), flush=True)


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "almanet.bench.workers", *args]


# How long a process of the bench may take to start.
START_TIMEOUT = 60.0


def wait_for_line(process: subprocess.Popen[str], stream: IO[str], predicate: Callable[[str], bool]) -> str:
    """The first line of the process's ``stream`` that ``predicate`` accepts, within START_TIMEOUT.

    ``RuntimeError`` if the process ends first or is silent that long (it is killed then).
    """
    with concurrent.futures.ThreadPoolExecutor(1) as reader:
        found = reader.submit(lambda: next((line for line in stream if predicate(line)), None))
        try:
            line = found.result(START_TIMEOUT)
        except concurrent.futures.TimeoutError:
            process.kill()  # which ends the reading too
            raise RuntimeError(f"{process.args!r} did not start within {START_TIMEOUT:g} s") from None
    if line is None:
        raise RuntimeError(f"{process.args!r} ended before it started")
    return line


@contextmanager
def service_process(system: str, address: str, name: str, env: dict[str, str] | None = None) -> Iterator[None]:
    """The system's service running and subscribed; stopped on exit."""
    process = subprocess.Popen(_command("serve", system, address, name), stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout is not None
        wait_for_line(process, process.stdout, lambda line: line.strip() == "ready")
        yield
    finally:
        stop(process)


@contextmanager
def publisher_process(system: str, address: str, name: str, count: int) -> Iterator[None]:
    process = subprocess.Popen(_command("publish", system, address, name, str(count)))
    try:
        yield
    finally:
        stop(process)


def measure(
    system: str, workload: str, address: str, name: str, count: int, window: int, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run one workload in a client process of its own; its figures."""
    done = subprocess.run(
        _command("measure", system, workload, address, name, str(count), str(window)),
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        check=True,
        timeout=600,
    )
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def stop(process: subprocess.Popen[Any]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main(argv: list[str]) -> None:
    role, system, address, name, *numbers = argv
    if role == "serve":
        run_loop(_serve(system, address, name))
    elif role == "publish":
        run_loop(_publish_to_nats(address, name, int(numbers[0])))
    else:
        workload, address, name, count, window = argv[2:]
        run_loop(_measure(system, workload, address, name, int(count), int(window)))


if __name__ == "__main__":
    main(sys.argv[1:])
