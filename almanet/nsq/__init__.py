"""almanet's NSQ client: ``Producer`` and ``Consumer`` over ``Connection``, on the frame codec.

``options`` holds what a connection asks of nsqd (``ConnectionOptions``),
``handshake`` how one is opened, ``connection`` one connection to an nsqd
in steady state, ``producer`` and ``consumer`` the two roles, ``ready`` a
consumer's RDY and backoff, ``lookupd`` nsqlookupd's ``/lookup`` and
``/nodes`` (``NsqdWatch``), ``http`` the HTTP client for both, ``sweeper``
the deleting of topics left behind. The protocol's facts and errors are in
``almanet.wire``.
"""

from almanet.nsq.connection import Connection, Message, MessagePart
from almanet.nsq.consumer import Consumer
from almanet.nsq.options import ConnectionOptions
from almanet.nsq.producer import Producer
from almanet.wire.errors import CommandError, CompressionError, FrameError, MessageTooBig, ProtocolError, Unauthorized

__all__ = [
    "CommandError",
    "CompressionError",
    "Connection",
    "ConnectionOptions",
    "Consumer",
    "FrameError",
    "Message",
    "MessagePart",
    "MessageTooBig",
    "Producer",
    "ProtocolError",
    "Unauthorized",
]
