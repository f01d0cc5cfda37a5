"""NsqdWatch: the nsqd that nsqlookupd lists, polled (embedded brokers answer /nodes and /lookup as nsqlookupd)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from almanet.broker import Broker
from almanet.nsq.lookupd import NsqdWatch
from almanet.pytest_plugin import broker_in_thread
from helpers import free_port


def lookupd_of_its_own() -> contextlib.AbstractContextManager[Broker]:
    """An embedded broker: it answers as nsqlookupd, listing itself."""
    return broker_in_thread(tcp_address="127.0.0.1:0", http_address="127.0.0.1:0", broadcast_address="127.0.0.1")


async def test_a_watch_lists_the_union_of_the_answers_and_keeps_the_last_known(
    caplog: pytest.LogCaptureFixture,
) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    told: list[frozenset[str]] = []
    with lookupd_of_its_own() as one, lookupd_of_its_own() as other:
        watch = NsqdWatch([f"http://{one.http_address}", f"http://{other.http_address}", down], poll_interval=0.05)
        watch.listen(told.append)
        with caplog.at_level(logging.WARNING, logger="almanet.nsq"):
            await watch.start()
            assert watch.known == {one.tcp_address, other.tcp_address}
            await asyncio.sleep(0.3)
        assert told == [watch.known]  # told of changes only
        (said,) = [record.getMessage() for record in caplog.records if down in record.getMessage()]
        assert said.startswith(f"nsqlookupd at {down} unreachable") and said.endswith("asking it again every 0.05 s")
        known = watch.known
    await asyncio.sleep(0.3)  # none answers now
    assert watch.known == known and told == [known]
    watch.stop()


async def test_a_watch_of_a_topic_lists_the_nsqd_that_have_it(topic: str) -> None:
    with lookupd_of_its_own() as broker:
        watch = NsqdWatch([f"http://{broker.http_address}"], poll_interval=0.05, topic=topic)
        await watch.start()
        assert watch.known == frozenset()
        reader, writer = await asyncio.open_connection(*broker.tcp_address.split(":"))
        writer.write(b"  V2" + f"PUB {topic}\n".encode() + b"\x00\x00\x00\x01x")
        await reader.readexactly(4 + 4 + 2)  # OK
        writer.close()
        for _ in range(100):
            if watch.known:
                break
            await asyncio.sleep(0.02)
        assert watch.known == {broker.tcp_address}
        watch.stop()


@pytest.mark.parametrize(
    ("addresses", "interval", "error"),
    [
        ([], 1.0, "at least one nsqlookupd"),
        (["http://127.0.0.1"], 1.0, "is not http://host:port"),
        (["http://127.0.0.1:4161"], 0.0, "lookupd_poll_interval"),
        (["http://127.0.0.1:4161"], float("nan"), "lookupd_poll_interval"),
    ],
)
def test_a_watch_refuses_what_it_cannot_use(addresses: list[str], interval: float, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        NsqdWatch(addresses, interval)
