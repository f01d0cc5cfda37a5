"""Every error almanet raises derives from AlmanetError, and from the builtin callers expect."""

import importlib
import inspect
import pkgutil

import pytest

import almanet
import almanet.broker
from almanet.broker.auth import AuthError
from almanet.broker.http import HTTPError
from almanet.broker.topics import NotInFlight, QueueFull


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (almanet.ConnectionFailed, ConnectionError),
        (almanet.CallTimeout, TimeoutError),
        (almanet.NoResponders, almanet.CallTimeout),
        (almanet.UnreadableBody, ValueError),
        (almanet.MessageTooBig, ValueError),
        (almanet.EnvelopeError, ValueError),
        (almanet.ProtocolError, Exception),
        (almanet.FrameError, almanet.ProtocolError),
        (almanet.CommandError, almanet.ProtocolError),
        (almanet.CompressionError, almanet.ProtocolError),
        (almanet.rpc_error, Exception),
        (almanet.InternalError, almanet.rpc_error),
        (QueueFull, Exception),
        (NotInFlight, Exception),
        (HTTPError, Exception),
        (AuthError, Exception),
    ],
)
def test_every_error_has_the_root_and_its_builtin(error: type[Exception], builtin: type[Exception]) -> None:
    assert issubclass(error, almanet.AlmanetError)
    assert issubclass(error, builtin)


def test_every_exception_the_broker_defines_has_the_root() -> None:
    """The embedded broker's, private ones too: none is a second root."""
    modules = [
        importlib.import_module(f"almanet.broker.{info.name}") for info in pkgutil.iter_modules(almanet.broker.__path__)
    ]
    defined = {
        value
        for module in modules
        for value in vars(module).values()
        if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == module.__name__
    }
    assert AuthError in defined
    assert sorted(error.__qualname__ for error in defined if not issubclass(error, almanet.AlmanetError)) == []


async def test_a_call_through_an_unreachable_nsqd_is_connection_failed() -> None:
    session = almanet.new_session("127.0.0.1:1")
    with pytest.raises(almanet.ConnectionFailed):
        await session.call("nobody.home", None, timeout=0.5)
