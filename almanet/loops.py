"""Running almanet on asyncio's event loop or on uvloop."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")

LoopName = Literal["asyncio", "uvloop"]
LOOPS: tuple[LoopName, ...] = ("asyncio", "uvloop")


def run(main: Coroutine[Any, Any, T], loop: LoopName = "asyncio") -> T:
    """``asyncio.run(main)`` on the named loop; uvloop needs ``pip install almanet[uvloop]``."""
    if loop == "uvloop":
        try:
            import uvloop
        except ImportError as error:
            main.close()
            raise RuntimeError("uvloop is not installed: pip install 'almanet[uvloop]'") from error
        result: T = uvloop.run(main)
        return result
    if loop != "asyncio":
        main.close()
        raise ValueError(f"unknown event loop {loop!r}: asyncio or uvloop")
    return asyncio.run(main)
