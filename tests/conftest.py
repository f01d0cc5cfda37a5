"""Shared fixtures (shared helpers are in helpers.py).

Every speedup test runs against both twins through one fixture per hot path.
Broker tests use the ``almanet_broker`` fixture of almanet's pytest plugin:
the embedded broker, and nsqd where there is one.
"""

import uuid
from collections.abc import AsyncIterator
from types import ModuleType

import pytest

import almanet
from almanet.pytest_plugin import BrokerAddresses
from helpers import load_twin

pytest_plugins = ["pytester"]

IMPLEMENTATIONS = ["c", "py"]


@pytest.fixture(params=IMPLEMENTATIONS)
def frames(request: pytest.FixtureRequest) -> ModuleType:
    return load_twin("frames", request.param)


@pytest.fixture(params=IMPLEMENTATIONS)
def envelope(request: pytest.FixtureRequest) -> ModuleType:
    return load_twin("envelope", request.param)


@pytest.fixture(params=IMPLEMENTATIONS)
def pending(request: pytest.FixtureRequest) -> ModuleType:
    return load_twin("pending", request.param)


@pytest.fixture
def topic() -> str:
    """A topic name no other test uses, so tests can share one broker."""
    return f"test.{uuid.uuid4().hex[:16]}"


@pytest.fixture
def prefix() -> str:
    """A URI prefix no other test uses, so tests can share one broker."""
    return f"test.{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def session(almanet_broker: BrokerAddresses) -> AsyncIterator[almanet.Session]:
    """A session joined to the shared broker."""
    async with almanet.new_session(almanet_broker.tcp_address) as session:
        yield session


@pytest.fixture
def tcp(almanet_broker: BrokerAddresses) -> str:
    """The shared broker's TCP address."""
    return almanet_broker.tcp_address


@pytest.fixture
def embedded(almanet_broker: BrokerAddresses) -> BrokerAddresses:
    """The shared broker, for tests of what only the embedded broker has (skipped against nsqd)."""
    if not almanet_broker.embedded:
        pytest.skip("tests the embedded broker only")
    return almanet_broker
