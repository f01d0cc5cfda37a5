import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

import almanet
from almanet.pytest_plugin import BrokerAddresses

# In your project these come from your application's modules (from myapp import service, session).
service = almanet.new_service("127.0.0.1:4150", prefix="net.example")
session = almanet.new_session("127.0.0.1:4150")


@service.procedure
async def greeting(payload: str) -> str:
    return f"Hello, {payload}!"


@pytest_asyncio.fixture
async def running(almanet_broker: BrokerAddresses) -> AsyncIterator[None]:
    """The service and the session on the test broker, started for each test and stopped after it."""
    service.use_addresses(almanet_broker.tcp_address)
    session.use_addresses(almanet_broker.tcp_address)
    async with service, session:
        yield


@pytest.fixture
def topic() -> str:
    """A topic of the test's own: the tests share the broker."""
    return f"test.{uuid.uuid4().hex[:12]}"


@pytest.mark.asyncio
async def test_greeting(running: None) -> None:
    reply = await session.call(greeting, "Aidar")
    assert reply.payload == "Hello, Aidar!"


@pytest.mark.asyncio
async def test_greeting_again(running: None) -> None:
    """The same service and session, started again in this test's event loop."""
    reply = await session.call("net.example.greeting", "Alice")
    assert reply.payload == "Hello, Alice!"


@pytest.mark.asyncio
async def test_produce_and_consume(running: None, topic: str) -> None:
    await session.produce(topic, {"order": 1})
    async with session.consume(topic, "kitchen") as messages:
        async for message in messages:
            assert message.payload == {"order": 1}
            message.commit()
            break
