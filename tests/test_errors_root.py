"""Every error almanet raises derives from AlmanetError, and from the builtin callers expect."""

import pytest

import almanet
from almanet.broker.http import HTTPError
from almanet.broker.topics import QueueFull


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
        (HTTPError, Exception),
    ],
)
def test_every_error_has_the_root_and_its_builtin(error: type[Exception], builtin: type[Exception]) -> None:
    assert issubclass(error, almanet.AlmanetError)
    assert issubclass(error, builtin)


async def test_a_call_through_an_unreachable_nsqd_is_connection_failed() -> None:
    session = almanet.new_session("127.0.0.1:1")
    with pytest.raises(almanet.ConnectionFailed):
        await session.call("nobody.home", None, timeout=0.5)
