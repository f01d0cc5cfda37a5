"""almanet: fast routed RPC and produce/consume for Python services over NSQ."""

from almanet._speedups import speedups
from almanet.nsq.errors import CommandError, FrameError, ProtocolError

__version__ = "0.1.0"

__all__ = ["CommandError", "FrameError", "ProtocolError", "__version__", "speedups"]
