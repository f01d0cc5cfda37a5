"""Connection options through the public API: sessions, services, consume() and procedures."""

from __future__ import annotations

from typing import Any

import pytest

import almanet


def test_calls_ask_for_each_message_at_once_and_consume_for_buffering() -> None:
    session = almanet.new_session("127.0.0.1:4150")
    assert session.options.output_buffer_size == -1
    subscription = session.consume("topic", "channel")
    assert (
        subscription._consumer.options.output_buffer_size,
        subscription._consumer.options.output_buffer_timeout,
    ) == (
        0,
        0.025,
    )
    unbuffered = session.consume("topic", "channel", output_buffer_size=-1)
    assert unbuffered._consumer.options.output_buffer_size == -1


def test_what_the_session_is_told_holds_for_consume_unless_consume_is_told_otherwise() -> None:
    session = almanet.new_session("127.0.0.1:4150", output_buffer_size=-1, msg_timeout=5.0, auth_secret="secret")
    options = session.consume("topic", "channel")._consumer.options
    assert (options.output_buffer_size, options.msg_timeout, options.auth_secret) == (-1, 5.0, "secret")
    assert session.consume("topic", "channel", msg_timeout=300)._consumer.options.msg_timeout == 300


def test_a_procedure_takes_options_of_its_own() -> None:
    service = almanet.new_service("127.0.0.1:4150", prefix="options", heartbeat_interval=10.0, max_msg_size=65536)

    @service.procedure(msg_timeout=600)
    async def slow(payload: Any, **kwargs: Any) -> None:
        pass

    assert (slow.options.msg_timeout, slow.options.heartbeat_interval, slow.options.max_msg_size) == (600, 10.0, 65536)
    assert service.session.options.msg_timeout is None


@pytest.mark.parametrize("make", [almanet.new_session, almanet.new_service])
def test_an_unknown_option_is_named(make: Any) -> None:
    with pytest.raises(TypeError, match=r"unknown connection option 'msg_timout'; the options are: .*msg_timeout"):
        make("127.0.0.1:4150", msg_timout=5)


def test_a_bad_option_value_is_refused() -> None:
    with pytest.raises(ValueError, match="output_buffer_size"):
        almanet.new_session("127.0.0.1:4150", output_buffer_size=-5)
