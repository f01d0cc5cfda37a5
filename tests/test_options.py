"""Connection options through the public API: sessions, services, consume() and procedures."""

from __future__ import annotations

import inspect
import re
import typing
from typing import Any

import pytest

import almanet
from almanet.nsq import ConnectionOptions
from almanet.options import SessionOptions


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


@pytest.mark.parametrize("make", [almanet.new_session, almanet.new_service, almanet.Session, almanet.Service])
def test_a_misspelt_keyword_is_named_by_the_function_called(make: Any) -> None:
    """Not ``Session.__init__()`` for ``new_service``: each takes its keywords itself, and lists them."""
    called = make.__name__ if inspect.isfunction(make) else f"{make.__name__}.__init__"
    with pytest.raises(TypeError, match=rf"^{re.escape(called)}\(\) got an unexpected keyword argument 'msg_timout'"):
        make("127.0.0.1:4150", msg_timout=5)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'prefx'; it takes: (\w+, )*timeout") as raised:
        make("127.0.0.1:4150", prefx="net.example")
    assert ("it takes: prefix, timeout" in str(raised.value)) == (make in (almanet.new_service, almanet.Service))


def test_consume_and_procedure_name_the_keywords_they_take() -> None:
    """They take ``**options``: the TypeError lists their own keywords, then the connection options."""
    connection = r"client_id, .*msg_timeout, .*max_body_size$"
    consume = (
        r"^consume\(\) got an unexpected keyword argument 'msg_timout'; "
        rf"it takes: topic, channel, max_in_flight, lookupd_poll_interval, {connection}"
    )
    with pytest.raises(TypeError, match=consume):
        almanet.new_session("127.0.0.1:4150").consume("topic", "channel", msg_timout=5)
    service = almanet.new_service("127.0.0.1:4150", prefix="options")
    procedure = (
        r"^procedure\(\) got an unexpected keyword argument 'chanel'; "
        rf"it takes: function, name, channel, max_concurrency, raises, {connection}"
    )
    with pytest.raises(TypeError, match=procedure):
        service.procedure(chanel="other")  # at once, before a function is given


def test_a_procedure_a_call_cannot_fill_is_refused_when_registered() -> None:
    service = almanet.new_service("127.0.0.1:4150", prefix="options")

    async def two(payload: str, count: int) -> str:
        return payload * count

    async def positional_only(payload: str, session: Any, /) -> None:
        pass

    for function, name in ((two, "count"), (positional_only, "session")):
        with pytest.raises(TypeError, match=rf"procedure options\.\w+: a call cannot fill its parameter '{name}'"):
            service.procedure(function)

    @service.procedure
    async def fine(payload: str, count: int = 2, *, session: Any, uri: str, **kwargs: Any) -> str:
        return payload * count

    async def positional_with_default(payload: str, deadline: float | None = None, /) -> str:
        return payload

    also_fine = service.procedure(positional_with_default)
    assert also_fine.context_names == ()  # deadline is not passed by keyword to a positional-only parameter
    assert [procedure.uri for procedure in service.procedures] == ["options.fine", "options.positional_with_default"]


def test_the_session_options_are_the_connection_options_the_timeout_and_the_poll_interval() -> None:
    """One list of keywords (``SessionOptions``, checked by mypy --strict through ``Unpack``) for all four."""
    hints = typing.get_type_hints(SessionOptions)
    field_hints = typing.get_type_hints(ConnectionOptions)
    assert hints.pop("timeout") is float
    assert hints.pop("lookupd_poll_interval") is float
    assert hints.keys() == field_hints.keys()
    for name, hint in hints.items():
        buffer = name in ("output_buffer_size", "output_buffer_timeout")  # None: almanet's choice
        assert hint == (field_hints[name] | None if buffer else field_hints[name]), name


@pytest.mark.parametrize("make", [almanet.new_session, almanet.new_service, almanet.Session, almanet.Service])
def test_each_takes_the_session_options(make: Any) -> None:
    (options,) = [p for p in inspect.signature(make).parameters.values() if p.kind is p.VAR_KEYWORD]
    assert options.annotation == "Unpack[SessionOptions]"


def test_the_output_buffer_left_to_almanet() -> None:
    """None: calls unbuffered, consume buffered; given to the session, it holds for both."""
    left = almanet.new_session("127.0.0.1:4150")
    assert (left.options.output_buffer_size, left.options.output_buffer_timeout) == (-1, None)
    options = left.consume("topic", "channel")._consumer.options
    assert (options.output_buffer_size, options.output_buffer_timeout) == (0, 0.025)
    sized = almanet.new_session("127.0.0.1:4150", output_buffer_size=4096)
    options = sized.consume("topic", "channel")._consumer.options
    assert (sized.options.output_buffer_size, options.output_buffer_size, options.output_buffer_timeout) == (
        4096,
        4096,
        0.025,
    )


def test_a_bad_option_value_is_refused() -> None:
    with pytest.raises(ValueError, match="output_buffer_size"):
        almanet.new_session("127.0.0.1:4150", output_buffer_size=-5)
