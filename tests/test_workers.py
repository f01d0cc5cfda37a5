"""``almanet serve --workers N``: the calls spread over N processes, a worker that dies is started again,
and one SIGTERM stops them all gracefully."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import almanet
from almanet.pytest_plugin import BrokerAddresses

APP = """
import os

import almanet

service = almanet.new_service("127.0.0.1:4150", prefix="workers")


@service.procedure
async def pid(payload: None, **kwargs: object) -> int:
    return os.getpid()
"""


async def pids_answering(session: almanet.Session, wanted: int, timeout: float = 30.0) -> set[int]:
    """The worker pids that answer calls, once ``wanted`` of them did (calls before they serve are retried)."""
    seen: set[int] = set()
    deadline = asyncio.get_running_loop().time() + timeout
    while len(seen) < wanted:
        assert asyncio.get_running_loop().time() < deadline, f"only {seen} answered"
        outcomes = await asyncio.gather(
            *(session.call("workers.pid", None, timeout=5) for _ in range(50)), return_exceptions=True
        )
        seen |= {outcome.payload for outcome in outcomes if isinstance(outcome, almanet.Reply)}
        await asyncio.sleep(0.1)
    return seen


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.asyncio
async def test_workers_share_the_calls_are_started_again_and_stop_together(
    almanet_broker: BrokerAddresses, tmp_path: Path
) -> None:
    (tmp_path / "workers_app.py").write_text(APP)
    # --work: argparse takes an abbreviation, and a worker must not start workers of its own.
    command = [sys.executable, "-m", "almanet", "serve", "workers_app:service", "--work", "2"]
    supervisor = subprocess.Popen([*command, "--address", almanet_broker.tcp_address], cwd=tmp_path)
    try:
        async with almanet.new_session(almanet_broker.tcp_address) as session:
            first = await pids_answering(session, 2)
            assert len(first) == 2 and supervisor.pid not in first
            killed = min(first)
            os.kill(killed, signal.SIGKILL)
            workers = await pids_answering(session, 2)  # the one left and the one started in its place
            assert killed not in workers and len(workers & first) == 1
        supervisor.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(supervisor.wait, 30) == 0
        assert not any(alive(pid) for pid in workers)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()


def test_workers_must_be_at_least_one() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "almanet", "serve", "workers_app:service", "--workers", "0"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "--workers" in done.stderr
