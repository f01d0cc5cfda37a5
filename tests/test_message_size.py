"""A message over the broker's --max-msg-size fails alone, on each kind of broker.

nsqd closes the connection that sent it, so sessions and services send big
messages apart from their calls and replies; the limit nsqd states in its
refusal is kept, and later ones fail at once.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import almanet
from almanet.pytest_plugin import brokers_available
from helpers import broker_of_kind

pytestmark = pytest.mark.asyncio

LIMIT = 65536
TIMEOUT = 10.0


@pytest.mark.parametrize("kind", brokers_available())
async def test_a_call_too_big_for_the_broker_fails_alone(kind: str) -> None:
    with broker_of_kind(kind, max_msg_size=LIMIT) as address:
        service = almanet.new_service(address, prefix="size")

        @service.procedure
        async def echo(payload: bytes, **kwargs: Any) -> int:
            return len(payload)

        async with service, almanet.new_session(address) as session:
            small = [session.call(echo, b"x" * 7, timeout=TIMEOUT) for _ in range(400)]
            calls = [*small[:200], session.call(echo, b"x" * 100_000, timeout=TIMEOUT), *small[200:]]
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            big = outcomes.pop(200)
            assert isinstance(big, almanet.MessageTooBig), big
            assert big.limit == LIMIT
            assert [outcome.payload for outcome in outcomes] == [7] * 400  # type: ignore[union-attr]
            # The limit is known now: the next one fails before it is sent.
            with pytest.raises(almanet.MessageTooBig, match="not sent"):
                await session.call(echo, b"x" * 100_000, timeout=TIMEOUT)
            assert (await session.call(echo, b"x" * 60_000, timeout=TIMEOUT)).payload == 60_000


@pytest.mark.parametrize("kind", brokers_available())
async def test_a_reply_too_big_for_the_broker_is_an_error_for_its_caller(kind: str) -> None:
    with broker_of_kind(kind, max_msg_size=LIMIT) as address:
        service = almanet.new_service(address, prefix="size")

        @service.procedure
        async def inflate(payload: int, **kwargs: Any) -> bytes:
            return b"x" * payload

        async with service, almanet.new_session(address) as session:
            (consumer,) = service._consumers
            (connection,) = consumer.connections.values()
            for _ in range(2):  # refused by the broker, then known beforehand
                with pytest.raises(almanet.InternalError, match="too big"):
                    await session.call(inflate, 100_000, timeout=TIMEOUT)
            assert len((await session.call(inflate, 100, timeout=TIMEOUT)).payload) == 100
            assert consumer.connections[connection.address] is connection  # the service kept its connection


SMALL_LIMIT = 8192  # below the old 16 KiB apart: a 12 KB call went in the MPUB of the calls beside it


@pytest.mark.parametrize("kind", brokers_available())
async def test_a_call_over_a_small_limit_fails_alone_and_so_does_a_reply(kind: str) -> None:
    with broker_of_kind(kind, max_msg_size=SMALL_LIMIT) as address:
        service = almanet.new_service(address, prefix="size")

        @service.procedure
        async def echo(payload: bytes, **kwargs: Any) -> int:
            return len(payload)

        @service.procedure
        async def inflate(payload: int, **kwargs: Any) -> bytes:
            return b"x" * payload

        async with service, almanet.new_session(address) as session:
            calls = [session.call(echo, b"x" * 7, timeout=TIMEOUT) for _ in range(200)]
            calls.insert(100, session.call(echo, b"x" * 12_000, timeout=TIMEOUT))
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            big = outcomes.pop(100)
            assert isinstance(big, almanet.MessageTooBig), big
            assert big.limit == SMALL_LIMIT
            assert [outcome.payload for outcome in outcomes] == [7] * 200  # type: ignore[union-attr]
            with pytest.raises(almanet.InternalError, match="too big"):
                await session.call(inflate, 12_000, timeout=TIMEOUT)
            assert (await session.call(echo, b"x" * 8_000, timeout=TIMEOUT)).payload == 8_000


@pytest.mark.parametrize("kind", brokers_available())
async def test_publishes_written_after_one_too_big_are_sent_again(kind: str) -> None:
    with broker_of_kind(kind, max_msg_size=SMALL_LIMIT) as address:
        async with almanet.new_session(address) as session:
            published = [session.produce("sized", b"x" * 12_000), *(session.produce("sized", n) for n in range(100))]
            outcomes = await asyncio.gather(*published, return_exceptions=True)
            assert isinstance(outcomes[0], almanet.MessageTooBig), outcomes[0]
            assert outcomes[1:] == [b"OK"] * 100


@pytest.mark.parametrize("kind", brokers_available())
async def test_an_mpub_refused_for_one_message_fails_that_message_alone(kind: str) -> None:
    """Produces of one loop iteration join one MPUB: nsqd refuses it whole, and the messages that fit go again."""
    with broker_of_kind(kind, max_msg_size=SMALL_LIMIT) as address:
        async with almanet.new_session(address) as session:
            sizes = [6_000] * 25 + [12_000] + [6_000] * 25 + [20_000]
            outcomes = await asyncio.gather(
                *(session.produce("joined", b"x" * size, raw=True) for size in sizes), return_exceptions=True
            )
            refused = [size for size, outcome in zip(sizes, outcomes, strict=True) if outcome != b"OK"]
            assert refused == [12_000, 20_000]
            assert all(isinstance(outcome, almanet.MessageTooBig) for outcome in outcomes if outcome != b"OK")
