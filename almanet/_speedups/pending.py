"""Pending-call table: the compiled twin when available, else the pure one."""

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from almanet._speedups.pending_py import *  # noqa: F403  (the pure twin is the type source)
else:
    from almanet._speedups import select

    _impl = select("pending")
    globals().update({name: getattr(_impl, name) for name in _impl.__all__})
    __all__ = _impl.__all__
