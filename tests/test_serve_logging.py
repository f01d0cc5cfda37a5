"""What a service logs: a line for each procedure served, each call at DEBUG only, errors naming the URI."""

from __future__ import annotations

import logging
import uuid

import pytest

import almanet
from almanet import loops
from almanet.pytest_plugin import BrokerAddresses


def two_procedures(address: str) -> almanet.Service:
    service = almanet.new_service(address, prefix=f"test.{uuid.uuid4().hex[:12]}")

    @service.procedure
    async def echo(payload: str) -> str:
        return payload

    @service.procedure(channel="other")
    async def unsendable(payload: None) -> object:
        return object()  # msgpack has no type for it

    return service


async def test_info_logs_what_is_served_and_no_call(
    almanet_broker: BrokerAddresses, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "almanet")
    service = two_procedures(almanet_broker.tcp_address)
    prefix, address = service.prefix, almanet_broker.tcp_address
    async with service, almanet.new_session(address) as session:
        assert f"serving {prefix}.echo (channel rpc) on {address}" in caplog.messages
        assert f"serving {prefix}.unsendable (channel other) on {address}" in caplog.messages
        await session.call(f"{prefix}.echo", "hi")
        assert not service._calls_started  # at INFO, no call is timed
    assert not [message for message in caplog.messages if " in " in message and " ms" in message]


async def test_debug_logs_each_call_and_errors_name_the_uri(
    almanet_broker: BrokerAddresses, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "almanet")
    service = two_procedures(almanet_broker.tcp_address)
    prefix = service.prefix
    async with service, almanet.new_session(almanet_broker.tcp_address) as session:
        await session.call(f"{prefix}.echo", "hi")
        with pytest.raises(almanet.InvalidPayload):
            await session.call(f"{prefix}.echo", 42)
        with pytest.raises(almanet.InternalError, match="cannot be encoded"):
            await session.call(f"{prefix}.unsendable", None)
    calls = [record.getMessage() for record in caplog.records if record.levelno == logging.DEBUG]
    assert any(message.startswith(f"{prefix}.echo: ok in ") and message.endswith(" ms") for message in calls)
    assert any(message.startswith(f"{prefix}.echo: InvalidPayload in ") for message in calls)
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert any(message.startswith(f"{prefix}.unsendable: the result of call ") for message in errors), errors
    assert not service._calls_started  # every call timed was logged


def test_serve_sets_up_logging_only_when_the_application_did_not(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", logging.WARNING)
    loops.log_to_stderr_unless_configured()
    assert len(root.handlers) == 1 and root.level == logging.INFO
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    loops.log_to_stderr_unless_configured(logging.DEBUG)  # once: configured by now
    assert root.handlers == [handler] and root.level == logging.INFO
