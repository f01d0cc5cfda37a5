"""almanet: fast routed RPC and produce/consume for Python services over NSQ."""

from almanet._speedups import speedups
from almanet._version import __version__
from almanet.nsq.errors import CommandError, FrameError, ProtocolError

__all__ = ["CommandError", "FrameError", "ProtocolError", "__version__", "speedups"]
