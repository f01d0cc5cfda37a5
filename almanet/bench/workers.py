"""Benchmark processes: ``python -m almanet.bench.workers ROLE SYSTEM ADDRESS NAME [...]``.

- ``serve SYSTEM ADDRESS NAME``: almanet's service (procedure ``NAME.echo``),
  the ansq baseline's (topic ``NAME``) or a NATS responder (subject ``NAME``),
  each answering with the payload it is given; prints ``ready`` once
  subscribed, serves until SIGTERM or SIGINT.
- ``measure SYSTEM ADDRESS NAME WORKLOAD COUNT WINDOW SIZE``: one workload of
  ``workloads.MEASURES``; prints its figures as one JSON line.

``ALMANET_BENCH_LOOP=uvloop`` runs the process on uvloop.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

from almanet import loops
from almanet.bench import workloads
from almanet.bench.processes import stop, wait_for_line


def run_loop(main: Coroutine[Any, Any, Any]) -> Any:
    """Run ``main`` on the loop ALMANET_BENCH_LOOP names (asyncio by default)."""
    return loops.run(main, "uvloop" if os.environ.get("ALMANET_BENCH_LOOP") == "uvloop" else "asyncio")


async def _serve(system: str, address: str, name: str) -> None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signal_number, stopping.set)
    if system == "almanet":
        import almanet

        service = almanet.new_service(address, prefix=name)

        @service.procedure
        async def echo(payload: Any) -> Any:
            return payload

        async with service:
            print("ready", flush=True)
            await stopping.wait()
    elif system == "nats":
        import nats

        client = await nats.connect(f"nats://{address}")

        async def respond(message: Any) -> None:
            await message.respond(message.data)

        await client.subscribe(name, cb=respond)
        await client.flush()
        print("ready", flush=True)
        await stopping.wait()
        await client.close()
    else:
        from almanet.bench import baseline

        ready = asyncio.Event()
        serving = asyncio.ensure_future(baseline.serve(address, name, ready, stopping))
        await ready.wait()
        print("ready", flush=True)
        await serving


async def _measure(system: str, workload: str, address: str, name: str, count: int, window: int, size: int) -> None:
    figures = await workloads.MEASURES[system, workload](address, name, count, window, size)
    print(json.dumps(figures), flush=True)


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "almanet.bench.workers", *args]


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


def measure(
    system: str,
    address: str,
    name: str,
    workload: str,
    count: int,
    window: int,
    size: int,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run one workload in a client process of its own; its figures."""
    done = subprocess.run(
        _command("measure", system, address, name, workload, str(count), str(window), str(size)),
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        check=True,
        timeout=600,
    )
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def main(argv: list[str]) -> None:
    role, system, address, name, *workload = argv
    if role == "serve":
        run_loop(_serve(system, address, name))
    else:
        kind, count, window, size = workload
        run_loop(_measure(system, kind, address, name, int(count), int(window), int(size)))


if __name__ == "__main__":
    main(sys.argv[1:])
