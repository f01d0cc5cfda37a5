"""Pending-call table: the compiled twin when available, else the pure one."""

from typing import TYPE_CHECKING

from almanet._speedups import NO_EXTENSIONS

__all__ = ["PendingCalls"]

# Which twin the names below come from, as almanet.speedups() reports it.
IMPLEMENTATION = "py"
# mypy reads the first branch only: the pure twin is the type source.
if TYPE_CHECKING or NO_EXTENSIONS:
    from almanet._speedups.pending_py import PendingCalls
else:
    try:
        from almanet._speedups.pending_c import PendingCalls

        IMPLEMENTATION = "c"
    except ImportError:
        from almanet._speedups.pending_py import PendingCalls
