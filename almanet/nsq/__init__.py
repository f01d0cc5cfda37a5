"""almanet's NSQ client: ``Producer`` and ``Consumer`` over ``Connection``, on the frame codec.

``protocol`` holds the facts of NSQ protocol V2, ``errors`` its exceptions,
``connection`` one connection to an nsqd, ``producer`` and ``consumer`` the
two roles, ``lookupd`` nsqlookupd's ``/lookup`` and ``/nodes`` (``NsqdWatch``),
``output`` write coalescing.
"""

from almanet.nsq.connection import Connection, Message
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
    "MessageTooBig",
    "Producer",
    "ProtocolError",
    "Unauthorized",
]
