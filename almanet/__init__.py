"""almanet: fast routed RPC and produce/consume for Python services over NSQ.

Every error almanet raises derives from ``AlmanetError``.
"""

from almanet._speedups import speedups
from almanet._speedups.envelope import EnvelopeError, Reply
from almanet._version import __version__
from almanet.asyncapi import describe
from almanet.conversion import UnencodablePayload
from almanet.errors import (
    CallTimeout,
    InternalError,
    InvalidEnvelope,
    InvalidPayload,
    InvalidReply,
    NoResponders,
    UnreadableBody,
    rpc_error,
)
from almanet.service import Procedure, Service, new_service
from almanet.session import Session, new_session
from almanet.subscription import ConsumedMessage, Subscription
from almanet.wire.errors import (
    AlmanetError,
    CommandError,
    CompressionError,
    ConnectionFailed,
    FrameError,
    MessageTooBig,
    ProtocolError,
    Unauthorized,
)

__all__ = [
    "AlmanetError",
    "CallTimeout",
    "CommandError",
    "CompressionError",
    "ConnectionFailed",
    "ConsumedMessage",
    "EnvelopeError",
    "FrameError",
    "InternalError",
    "InvalidEnvelope",
    "InvalidPayload",
    "InvalidReply",
    "MessageTooBig",
    "NoResponders",
    "Procedure",
    "ProtocolError",
    "Reply",
    "Service",
    "Session",
    "Subscription",
    "Unauthorized",
    "UnencodablePayload",
    "UnreadableBody",
    "__version__",
    "describe",
    "new_service",
    "new_session",
    "rpc_error",
    "speedups",
]
