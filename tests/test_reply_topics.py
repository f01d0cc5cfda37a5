"""Reply topics left behind are deleted: those of callers that died with calls in flight, and made-up ones.

nsqd deletes an ephemeral topic when its last channel goes, and a later
publish creates it again with no channel, which nsqd keeps until it
restarts. Services sweep such reply topics (almanet.nsq.sweeper) through
nsqd's HTTP API beside its TCP port; the tests sweep every 0.3 s instead of 30.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

import almanet
from almanet.broker.nsqd import find_nsqd, nsqd_process
from almanet.nsq import Producer, sweeper
from almanet.pytest_plugin import broker_in_thread, brokers_available
from almanet.rpc import REPLY_TOPIC_PREFIX, invocation_envelope
from helpers import free_port

pytestmark = pytest.mark.asyncio

INTERVAL = 0.3


@contextlib.contextmanager
def broker_with_http_beside(kind: str) -> Iterator[tuple[str, str]]:
    """A broker whose HTTP port is its TCP port + 1, as nsqd's defaults are: its TCP and HTTP addresses."""
    for _ in range(20):
        port = free_port()
        with contextlib.suppress(OSError):
            with contextlib.closing(__import__("socket").socket()) as probe:
                probe.bind(("127.0.0.1", port + 1))
            break
    tcp, http = f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"
    if kind == "embedded":
        with broker_in_thread(tcp_address=tcp, http_address=http):
            yield tcp, http
        return
    executable = find_nsqd()
    if executable is None:
        pytest.skip("needs an nsqd binary to start (ALMANET_NSQD or PATH)")
    with nsqd_process(executable, f"-tcp-address={tcp}", f"-http-address={http}"):
        yield tcp, http


async def reply_topics(http: str) -> dict[str, int]:
    """The reply topics on the broker, with their number of channels."""

    def get() -> dict[str, Any]:
        with urllib.request.urlopen(f"http://{http}/stats?format=json", timeout=10) as response:
            report: dict[str, Any] = json.load(response)
            return report

    report = await asyncio.to_thread(get)
    return {
        topic["topic_name"]: len(topic["channels"])
        for topic in report["topics"] or []
        if topic["topic_name"].startswith(REPLY_TOPIC_PREFIX)
    }


CALLER = """
import asyncio, sys
import almanet

async def main():
    async with almanet.new_session(sys.argv[1]) as session:
        calls = [asyncio.ensure_future(session.call("left.slow", n, timeout=30)) for n in range(3)]
        await asyncio.sleep(0.5)
        print(session.reply_topic, flush=True)
        await asyncio.gather(*calls)

asyncio.run(main())
"""


@pytest.mark.parametrize("kind", brokers_available())
async def test_the_reply_topic_of_a_caller_killed_with_calls_in_flight_is_deleted(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sweeper, "SWEEP_INTERVAL", INTERVAL)
    with broker_with_http_beside(kind) as (tcp, http):
        service = almanet.new_service(tcp, prefix="left")
        started = asyncio.Event()

        @service.procedure
        async def slow(payload: int, **kwargs: Any) -> int:
            started.set()
            await asyncio.sleep(1.0)
            return payload

        async with service, almanet.new_session(tcp) as alive:
            await alive.call("left.slow", 0, timeout=10)  # a live caller's reply topic stays
            caller = subprocess.Popen(
                [sys.executable, "-c", textwrap.dedent(CALLER), tcp], stdout=subprocess.PIPE, text=True
            )
            assert caller.stdout is not None
            left = (await asyncio.to_thread(caller.stdout.readline)).strip()
            await started.wait()
            caller.send_signal(signal.SIGKILL)
            caller.wait()
            caller.stdout.close()
            await asyncio.sleep(1.2)  # the replies, which create its topic again
            seen = await reply_topics(http)
            for _ in range(50):
                if left not in seen:
                    break
                await asyncio.sleep(0.1)
                seen = await reply_topics(http)
            assert left not in seen
            assert seen.get(alive.reply_topic) == 1


@pytest.mark.parametrize("kind", brokers_available())
async def test_made_up_reply_topics_last_two_sweeps_at_most(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sweeper, "SWEEP_INTERVAL", INTERVAL)
    with broker_with_http_beside(kind) as (tcp, http):
        service = almanet.new_service(tcp, prefix="madeup")

        @service.procedure
        async def echo(payload: int, **kwargs: Any) -> int:
            return payload

        async with service, Producer(tcp) as producer:
            made_up = [f"{REPLY_TOPIC_PREFIX}{n:016x}#ephemeral" for n in range(100)]
            invocations = [invocation_envelope(1, topic, 0, None, 1) for topic in made_up]
            await producer.publish_batch("madeup.echo", invocations)
            await asyncio.sleep(0.3)
            assert set(made_up) <= set(await reply_topics(http))  # what nsqd keeps today
            await asyncio.sleep(3 * INTERVAL)
            for _ in range(50):
                if not set(made_up) & set(await reply_topics(http)):
                    break
                await asyncio.sleep(0.1)
            assert not set(made_up) & set(await reply_topics(http))


async def test_an_nsqd_without_its_http_api_beside_is_not_swept_and_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with broker_in_thread(tcp_address="127.0.0.1:0", http_address="127.0.0.1:0") as broker:
        reply_topics_ = sweeper.TopicSweeper(REPLY_TOPIC_PREFIX)
        with caplog.at_level("INFO", logger="almanet.nsq"):
            for _ in range(3):
                assert await reply_topics_.sweep([broker.tcp_address]) == []
        said = [record.getMessage() for record in caplog.records if "not deleted" in record.getMessage()]
        assert len(said) == 1 and broker.tcp_address in said[0]
