"""Sessions and services on a broker that requires AUTH, through the public API: the embedded broker and nsqd.

The broker asks an auth server over HTTP (``--auth-http-address``); the test
runs one (``authserver``) that grants every topic to one secret, and some
topics to another. test_broker_secure.py tests the embedded broker's auth
with pynsq.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from authserver import AuthServer, allow, grant

import almanet
from almanet.broker.nsqd import find_nsqd, nsqd_process
from almanet.pytest_plugin import broker_in_thread
from helpers import eventually

pytestmark = pytest.mark.asyncio

SECRET = "open sesame"


LIMITED = "only orders"
GRANTS = {
    SECRET: grant("tester", allow(".*")),
    # Calls and replies, and publishing to orders.* only.
    LIMITED: grant("limited", allow(r"orders\..*", permissions=("publish",)), allow(r"_almanet\..*")),
}


@pytest.fixture(params=["embedded", "nsqd"])
def broker_with_auth(request: pytest.FixtureRequest) -> Iterator[str]:
    """A broker of the test's own that asks the test's auth server; its TCP address."""
    with AuthServer(GRANTS) as server:
        if request.param == "embedded":
            with broker_in_thread(
                tcp_address="127.0.0.1:0", http_address="127.0.0.1:0", auth_http_address=server.address
            ) as broker:
                yield broker.tcp_address
            return
        executable = find_nsqd()
        if executable is None:
            pytest.skip("needs an nsqd binary to start (ALMANET_NSQD or PATH)")
        with nsqd_process(executable, f"-auth-http-address={server.address}") as (tcp_address, _):
            yield tcp_address


async def test_calls_and_consuming_work_with_the_secret(broker_with_auth: str) -> None:
    address = broker_with_auth
    service = almanet.new_service(address, prefix="auth", auth_secret=SECRET)

    @service.procedure
    async def greet(payload: str, **kwargs: Any) -> str:
        return f"hello {payload}"

    async with service, almanet.new_session(address, auth_secret=SECRET) as session:
        assert (await session.call(greet, "you", timeout=10)).payload == "hello you"
        await eventually(lambda: greet.uri in session._discovery.batches)  # and in batches, once they may
        names = [f"n{number}" for number in range(200)]
        replies = await asyncio.gather(*(session.call(greet, name, timeout=10) for name in names))
        assert [reply.payload for reply in replies] == [f"hello {name}" for name in names]
        await session.produce("auth.events", {"n": 1})
        async with session.consume("auth.events", "ch") as messages:
            async for message in messages:
                message.commit()
                assert message.payload == {"n": 1}
                break


async def test_without_the_secret_joining_fails_clearly(broker_with_auth: str) -> None:
    with pytest.raises(ConnectionError, match="requires AUTH and no auth_secret"):
        async with almanet.new_session(broker_with_auth):
            pass


async def test_a_wrong_secret_is_refused(broker_with_auth: str) -> None:
    with pytest.raises(ConnectionError, match="E_AUTH_FAILED AUTH failed"):
        async with almanet.new_session(broker_with_auth, auth_secret="wrong"):
            pass


async def test_a_denied_permission_is_a_clear_error_and_the_rest_goes_on(broker_with_auth: str) -> None:
    async with almanet.new_session(broker_with_auth, auth_secret=LIMITED) as session:
        assert await session.produce("orders.placed", {"n": 1}) == b"OK"
        with pytest.raises(almanet.CommandError, match='E_UNAUTHORIZED AUTH failed for PUB on "payments" ""'):
            await session.produce("payments", {"n": 1})
        assert await session.produce("orders.placed", {"n": 2}) == b"OK"  # on a new connection


async def test_a_call_to_a_denied_uri_fails_alone_amid_calls_in_flight(broker_with_auth: str) -> None:
    """nsqd closes the connection that sent a denied PUB: calls to a topic go apart until it answers one."""
    address = broker_with_auth
    service = almanet.new_service(address, prefix="orders", auth_secret=SECRET)

    @service.procedure
    async def get(payload: int, **kwargs: Any) -> int:
        return payload

    refunds = almanet.new_service(address, prefix="payments", auth_secret=SECRET)

    @refunds.procedure
    async def refund(payload: int, **kwargs: Any) -> int:
        return payload

    async with service, refunds, almanet.new_session(address, auth_secret=LIMITED) as session:
        calls = [session.call("orders.get", n, timeout=10) for n in range(200)]
        calls.insert(100, session.call("payments.refund", 1, timeout=10))
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        denied = outcomes.pop(100)
        assert isinstance(denied, almanet.Unauthorized), denied
        assert "publish permission on topic payments.refund" in str(denied)
        assert [outcome.payload for outcome in outcomes] == list(range(200))  # type: ignore[union-attr]
        # Nothing reconnects in the way of the next ones, nor after the next denial.
        again = await asyncio.gather(
            *(session.call("orders.get", n, timeout=10) for n in range(50)),
            session.call("payments.refund", 2, timeout=10),
            *(session.call("orders.get", n, timeout=10) for n in range(50)),
            return_exceptions=True,
        )
        assert isinstance(again.pop(50), almanet.Unauthorized)
        assert [outcome.payload for outcome in again] == [*range(50), *range(50)]  # type: ignore[union-attr]


async def test_publishes_written_after_a_denied_one_are_sent_again(broker_with_auth: str) -> None:
    """nsqd runs nothing after the command it refused: the producer sends those again on a new connection."""
    async with almanet.new_session(broker_with_auth, auth_secret=LIMITED) as session:
        published = [session.produce("payments", {"n": 0}), *(session.produce("orders.placed", n) for n in range(100))]
        outcomes = await asyncio.gather(*published, return_exceptions=True)
        assert isinstance(outcomes[0], almanet.Unauthorized)
        assert outcomes[1:] == [b"OK"] * 100
    async with almanet.new_session(broker_with_auth, auth_secret=SECRET) as reader:
        async with reader.consume("orders.placed", "all") as messages:
            received = []
            async for message in messages:
                message.commit()
                received.append(message.payload)
                if len(received) == 100:
                    break
        assert sorted(received) == list(range(100))


async def test_publishes_after_a_denied_one_are_sent_again_while_the_session_leaves(broker_with_auth: str) -> None:
    session = almanet.new_session(broker_with_auth, auth_secret=LIMITED)
    await session.join()
    published = [session.produce("payments", {"n": 0}), *(session.produce("orders.placed", n) for n in range(100))]
    await session.leave()
    outcomes = await asyncio.gather(*published, return_exceptions=True)
    assert isinstance(outcomes[0], almanet.Unauthorized)
    assert outcomes[1:] == [b"OK"] * 100
