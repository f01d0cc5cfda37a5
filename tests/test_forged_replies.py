"""Replies nobody can forge: unguessable call ids, replies only from where the call went, replies only to sessions.

An attacker here can publish to the broker; what it can still do (read the
invocations of a topic it may subscribe to) is in docs/RPC.md's "Replies
nobody can forge".
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

import almanet
from almanet._speedups.envelope import Invocation, decode, encode_invocation, encode_reply
from almanet.nsq import Producer
from almanet.pytest_plugin import BrokerAddresses, broker_in_thread
from helpers import eventually, topic_stats

TIMEOUT = 10.0


@pytest.fixture
def prefix() -> str:
    return f"forge.{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def silent_service(almanet_broker: BrokerAddresses, prefix: str) -> AsyncIterator[list[Any]]:
    """A service whose ``balance`` never answers; the payloads it was called with."""
    calls: list[Any] = []
    service = almanet.new_service(almanet_broker.tcp_address, prefix=prefix)

    @service.procedure
    async def balance(payload: Any) -> None:
        calls.append(payload)
        await asyncio.Event().wait()

    async with service:
        yield calls
        await service.stop(timeout=0)


async def test_a_reply_with_a_guessed_call_id_is_not_taken(
    almanet_broker: BrokerAddresses, silent_service: list[Any], prefix: str
) -> None:
    async with almanet.new_session(almanet_broker.tcp_address) as victim:
        call = asyncio.ensure_future(victim.call(f"{prefix}.balance", "victim", timeout=2))
        await eventually(lambda: silent_service)
        forged = [encode_reply(call_id, True, {"balance": 1_000_000_000}) for call_id in range(1, 2001)]
        async with Producer(almanet_broker.tcp_address) as attacker:
            await attacker.publish_batch(victim.reply_topic, forged)
        with pytest.raises(almanet.CallTimeout):
            await call


async def test_a_reply_from_another_nsqd_than_the_calls_is_not_taken(
    almanet_broker: BrokerAddresses, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Even with the call id (read off the wire, say): the reply must come by the nsqd the call went to."""
    with broker_in_thread(tcp_address="127.0.0.1:0", http_address="127.0.0.1:0") as other:
        both = (almanet_broker.tcp_address, other.tcp_address)
        service = almanet.new_service(*both, prefix=prefix)

        @service.procedure
        async def balance(payload: Any) -> None:
            await asyncio.Event().wait()

        async with service, almanet.new_session(*both) as spy, almanet.new_session(*both) as victim:
            invocations = spy.consume(f"{prefix}.balance", "spy", output_buffer_size=-1)
            await invocations.start()
            call = asyncio.ensure_future(victim.call(f"{prefix}.balance", "victim", timeout=2))
            seen = await asyncio.wait_for(anext(invocations), TIMEOUT)
            seen.commit()
            invocation = decode(seen.body)
            assert isinstance(invocation, Invocation)
            assert victim._calls.connection is not None and victim._replies is not None
            await eventually(lambda: len(victim._replies.connections) == 2)  # the reply topic read on both
            elsewhere = next(address for address in both if address != victim._calls.connection.address)
            async with Producer(elsewhere) as attacker:
                forged = encode_reply(invocation.call_id, True, {"balance": 10**9})
                await attacker.publish(victim.reply_topic, forged)
            await eventually(lambda: "the call went to nsqd at" in caplog.text)
            with pytest.raises(almanet.CallTimeout):
                await call
            await invocations.stop()
            await service.stop(timeout=0)


async def test_a_service_runs_no_call_whose_reply_topic_is_not_a_sessions(
    almanet_broker: BrokerAddresses, silent_service: list[Any], prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="almanet")
    victim_topic = f"{prefix}.orders.victim"
    async with Producer(almanet_broker.tcp_address) as attacker:
        for reply_to in (victim_topic, "_almanet.reply.not-hex-at-all#ephemeral"):
            await attacker.publish(f"{prefix}.balance", encode_invocation(7, reply_to, 0, None, "attacker"))
        await attacker.publish(f"{prefix}.balance", encode_invocation(0, None, 0, None, "no reply wanted"))
    await eventually(lambda: silent_service == ["no reply wanted"])
    assert caplog.text.count("not a session's topic") == 2
    assert await topic_stats(almanet_broker.http_address, victim_topic) is None
