"""almanet: fast routed RPC and produce/consume for Python services over NSQ."""

from almanet._speedups import speedups
from almanet._version import __version__
from almanet.errors import InternalError, InvalidEnvelope, InvalidPayload, InvalidReply, rpc_error
from almanet.nsq.errors import CommandError, FrameError, MessageTooBig, ProtocolError
from almanet.service import Procedure, Service, new_service
from almanet.session import ConsumedMessage, Session, Subscription, new_session

__all__ = [
    "CommandError",
    "ConsumedMessage",
    "FrameError",
    "InternalError",
    "InvalidEnvelope",
    "InvalidPayload",
    "InvalidReply",
    "MessageTooBig",
    "Procedure",
    "ProtocolError",
    "Service",
    "Session",
    "Subscription",
    "__version__",
    "new_service",
    "new_session",
    "rpc_error",
    "speedups",
]
