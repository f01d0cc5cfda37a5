"""Running almanet on asyncio's event loop or on uvloop."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")

LoopName = Literal["asyncio", "uvloop"]
LOOPS: tuple[LoopName, ...] = ("asyncio", "uvloop")

LOG_FORMAT = "[%(name)s] %(asctime)s %(levelname)s: %(message)s"


def log_to_stderr_unless_configured(level: int = logging.INFO) -> None:
    """Log to stderr from ``level`` up, unless the application set up logging (the root logger has a handler)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)


def default_loop() -> LoopName:
    """uvloop when it is installed, else asyncio: on nsqd, uvloop takes 1.2 times the calls (docs/PERFORMANCE.md)."""
    return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"


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


async def serve_until_signal(start: Callable[[], Awaitable[None]], stop: Callable[[], Awaitable[None]]) -> None:
    """``await start()``, run until SIGINT or SIGTERM, then ``await stop()`` (also when start fails).

    A signal while ``start()`` still runs (waiting for nsqd) cancels it; a
    second one while ``stop()`` runs cancels that too (``asyncio.CancelledError``
    out of this coroutine), for whoever does not want to wait.
    """
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signal_number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signal_number, stopping.set)
    starting = asyncio.ensure_future(start())
    signalled = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait((starting, signalled), return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # start's error, if any
            await signalled
        logging.getLogger("almanet").info("stopping (a second SIGINT or SIGTERM stops at once)")
    finally:
        serving = asyncio.current_task()
        assert serving is not None
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signal_number, serving.cancel)
        try:
            for task in (starting, signalled):
                task.cancel()
            await asyncio.gather(starting, signalled, return_exceptions=True)
            await stop()
        finally:
            for signal_number in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signal_number)


async def within(awaitable: Awaitable[T], timeout: float) -> T:
    """``awaitable``'s result within ``timeout`` seconds (else ``asyncio.TimeoutError``); cancelled with the caller.

    Not ``asyncio.wait_for``: before Python 3.12, when the awaitable finishes
    as the caller is cancelled, it returns the result and drops the
    cancellation, and a consumer being stopped went on to handshake with a
    connection it had just opened.
    """
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait((task,), timeout=timeout)
    except BaseException:
        task.cancel()
        raise
    if not done:
        task.cancel()
        raise asyncio.TimeoutError
    return task.result()
