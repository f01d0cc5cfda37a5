"""Helpers the tests share (fixtures are in conftest.py)."""

import asyncio
import contextlib
import importlib
import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import strategies as st

import almanet
from almanet._speedups import NO_EXTENSIONS
from almanet.broker.nsqd import find_nsqd, nsqd_process
from almanet.pytest_plugin import broker_in_thread


def load_twin(name: str, implementation: str) -> ModuleType:
    """The ``c`` or ``py`` twin of hot path ``name``.

    A compiled twin that does not import is a failure, unless
    ALMANET_NO_EXTENSIONS asked for none.
    """
    if implementation == "c" and NO_EXTENSIONS:
        pytest.skip("ALMANET_NO_EXTENSIONS is set: the compiled twin is not built")
    return importlib.import_module(f"almanet._speedups.{name}_{implementation}")


async def eventually(condition: Callable[[], object], timeout: float = 10.0) -> None:
    """Wait until ``condition()`` is true, checking every few milliseconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still false after {timeout} s: {condition}")
        await asyncio.sleep(0.01)


def mutate(draw: st.DrawFn, data: bytes) -> bytes:
    """Flip, drop or insert a few bytes of ``data``, or cut it short."""
    mutated = bytearray(data)
    for _ in range(draw(st.integers(0, 3))):
        if not mutated:
            break
        at = draw(st.integers(0, len(mutated) - 1))
        action = draw(st.sampled_from(["flip", "drop", "insert", "cut"]))
        if action == "flip":
            mutated[at] = draw(st.integers(0, 255))
        elif action == "drop":
            del mutated[at]
        elif action == "insert":
            mutated[at:at] = draw(st.binary(min_size=1, max_size=4))
        else:
            del mutated[at:]
    return bytes(mutated)


async def channel_stats(http_address: str, topic: str, channel: str = "ch") -> dict[str, Any] | None:
    """The channel's entry of ``/stats?format=json``, or None while it does not exist."""
    entry = await topic_stats(http_address, topic)
    return None if entry is None else next((c for c in entry["channels"] if c["channel_name"] == channel), None)


async def topic_stats(http_address: str, topic: str) -> dict[str, Any] | None:
    """The topic's entry of ``/stats?format=json``, or None while it does not exist.

    Read in a thread: an embedded broker of the test runs in the test's loop.
    """

    def get() -> dict[str, Any]:
        query = urllib.parse.urlencode({"format": "json", "topic": topic})
        with urllib.request.urlopen(f"http://{http_address}/stats?{query}", timeout=10) as response:
            report: dict[str, Any] = json.load(response)
            return report

    report = await asyncio.to_thread(get)
    return next((entry for entry in report["topics"] or [] if entry["topic_name"] == topic), None)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def broker_of_kind(kind: str, tcp_address: str = "127.0.0.1:0", *, max_msg_size: int | None = None) -> Iterator[str]:
    """A broker of the test's own, ``embedded`` or ``nsqd`` (skipped when it cannot be started); its TCP address."""
    if kind == "embedded":
        settings: dict[str, Any] = {} if max_msg_size is None else {"max_msg_size": max_msg_size}
        with broker_in_thread(tcp_address=tcp_address, http_address="127.0.0.1:0", **settings) as broker:
            yield broker.tcp_address
        return
    executable = find_nsqd()
    if executable is None:
        pytest.skip("nsqd is named by ALMANET_TEST_NSQD only: this test starts its own")
    flags = [f"-tcp-address={tcp_address}"] + ([] if max_msg_size is None else [f"-max-msg-size={max_msg_size}"])
    with nsqd_process(executable, *flags) as (tcp_address, _):
        yield tcp_address


def wait_until_served(address: str, uri: str) -> None:
    """Return once ``uri`` answers a call on the nsqd at ``address`` (a str payload), within 60 s.

    For a service in a process of its own, which may still be starting: calls until then get NoResponders.
    Sync, with a loop of its own: from async tests, run it in a thread.
    """

    async def served() -> None:
        async with almanet.new_session(address) as session:
            while not await answers(session):
                pass

    async def answers(session: almanet.Session) -> bool:
        try:
            await session.call(uri, "probe")
        except almanet.NoResponders:
            return False
        return True

    asyncio.run(asyncio.wait_for(served(), 60))


PROJECT = Path(__file__).resolve().parent.parent


def mypy_strict(directory: Path, *files: str, cache: str) -> subprocess.CompletedProcess[str]:
    """``mypy --strict FILES`` in ``directory``, almanet read as an installed package is (cache: its own name)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--follow-imports=silent",
            "--no-error-summary",
            "--cache-dir",
            str(PROJECT / ".mypy_cache" / cache),
            *files,
        ],
        cwd=directory,
        env={"MYPYPATH": str(PROJECT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
