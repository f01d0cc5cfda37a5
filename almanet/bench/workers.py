"""Benchmark processes: ``python -m almanet.bench.workers ROLE SYSTEM ADDRESS NAME [...]``.

- ``serve SYSTEM ADDRESS NAME``: almanet's service (procedure ``NAME.echo``),
  the ansq baseline's (topic ``NAME``) or a NATS responder (subject ``NAME``),
  each answering with the payload it is given; prints ``ready`` once
  subscribed, serves until SIGTERM or SIGINT. almanet's takes several
  addresses, comma-separated (nsqd's, nsqlookupd's ``http://host:port``).
- ``measure SYSTEM ADDRESS NAME WORKLOAD COUNT WINDOW SIZE``: one workload of
  ``workloads.MEASURES``; prints its figures as one JSON line.
- ``load ADDRESS NAME COUNT WINDOW SIZE``: one of the almanet callers of
  ``rpc_under_load``: prints ``warm`` after its warm-up, starts its calls when
  it reads a line, then prints when they started and ended as one JSON line;
  once its stdin is closed, their latencies as another, and it leaves.

``ALMANET_BENCH_LOOP=uvloop`` runs the process on uvloop.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from almanet import loops
from almanet.bench import workloads
from almanet.bench.processes import cpu_seconds, stop, wait_for_line


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

        service = almanet.new_service(*address.split(","), prefix=name)

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


async def _load(address: str, name: str, count: int, window: int, size: int) -> None:
    loop = asyncio.get_running_loop()

    async def go() -> None:
        print("warm", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)

    async def report(figures: dict[str, Any]) -> None:
        latencies = figures.pop("latencies_us")
        print(json.dumps(figures), flush=True)
        # Encoding the latencies is no part of the calls: it waits until every CPU time is read (stdin is closed).
        await loop.run_in_executor(None, sys.stdin.read)
        print(json.dumps(latencies), flush=True)

    await workloads.almanet_rpc_under_load(address, name, count, window, size, go, report)


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "almanet.bench.workers", *args]


@contextmanager
def service_process(
    system: str, address: str, name: str, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[str]]:
    """The system's service running and subscribed; stopped on exit."""
    process = subprocess.Popen(_command("serve", system, address, name), stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout is not None
        wait_for_line(process, process.stdout, lambda line: line.strip() == "ready")
        yield process
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


def rpc_under_load(
    addresses: Sequence[str],
    name: str,
    count: int,
    window: int,
    size: int,
    watched: Mapping[str, int],
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Calls to ``name``'s echo from one almanet caller process per address, all at once, ``count`` each.

    The measured window holds the calls only: every caller warms up, then
    waits; the CPU time of the callers and of the ``watched`` processes (pid
    by name) is read, every caller told to go, and it is read again once each
    has said when its calls started and ended, before any prints their
    latencies or leaves its session. Figures: ``calls`` (all the callers'),
    ``seconds`` (from the first caller's start to the last one's end),
    ``latencies_us`` (every call's) and ``cpu_s``, by name: each watched
    process's, and ``callers``, their sum.
    """
    callers = [
        subprocess.Popen(_command("load", address, name, str(count), str(window), str(size)),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        for address in addresses
    ]  # fmt: skip
    try:
        for caller in callers:
            assert caller.stdout is not None
            wait_for_line(caller, caller.stdout, lambda line: line.strip() == "warm")
        before = _cpu_seconds(callers, watched)
        for caller in callers:
            assert caller.stdin is not None
            caller.stdin.write("go\n")
            caller.stdin.flush()
        spans = [_json_line(caller) for caller in callers]  # when each one's calls started and ended
        after = _cpu_seconds(callers, watched)
        for caller in callers:
            assert caller.stdin is not None
            caller.stdin.close()
        latencies = [latency for caller in callers for latency in _json_line(caller)]
        for caller in callers:
            if caller.wait(timeout=30) != 0:
                raise RuntimeError(f"{caller.args!r} failed")
    finally:
        for caller in callers:
            stop(caller)
    return {
        "calls": count * len(callers),
        "seconds": max(span["ended"] for span in spans) - min(span["started"] for span in spans),
        "latencies_us": latencies,
        "cpu_s": {process: after[process] - before[process] for process in before},
    }


def _cpu_seconds(callers: list[subprocess.Popen[str]], watched: Mapping[str, int]) -> dict[str, float]:
    """The CPU time of each watched process, and of the callers together."""
    used = {name: cpu_seconds(pid) for name, pid in watched.items()}
    used["callers"] = sum(cpu_seconds(caller.pid) for caller in callers)
    return used


def _json_line(caller: subprocess.Popen[str]) -> Any:
    assert caller.stdout is not None
    line = caller.stdout.readline()
    if not line:
        raise RuntimeError(f"{caller.args!r} ended before it printed its figures")
    return json.loads(line)


def main(argv: list[str]) -> None:
    role, *args = argv
    if role == "load":
        address, name, count, window, size = args
        run_loop(_load(address, name, int(count), int(window), int(size)))
        return
    system, address, name, *workload = args
    if role == "serve":
        run_loop(_serve(system, address, name))
    else:
        kind, count, window, size = workload
        run_loop(_measure(system, kind, address, name, int(count), int(window), int(size)))


if __name__ == "__main__":
    main(sys.argv[1:])
