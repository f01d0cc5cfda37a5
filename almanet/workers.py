"""``almanet serve --workers N``: N processes of one service, each with its own event loop, on one channel.

Each worker is ``almanet serve`` with the same arguments but ``--workers``;
nsqd hands a channel's messages out across its clients, so the calls spread
over the workers as over instances on several hosts, and a CPU-bound
procedure gets a core a worker. The supervisor:

- passes SIGINT and SIGTERM on to every worker (SIGHUP as SIGTERM), which
  stops gracefully (its calls finish and reply; a second signal stops it at
  once, as it does ``almanet serve``), and exits once they all have: 0 when
  every worker stopped cleanly. Workers run in a process session of their
  own, so a terminal's Ctrl-C (or hang-up) reaches them once, through the
  supervisor; under systemd, use ``KillMode=mixed`` for the same reason.
  A supervisor killed with SIGKILL leaves its workers running;
- starts again a worker that exits while not told to stop, after a pause
  of ``RESTART_DELAY`` seconds, doubled up to ``MAX_RESTART_DELAY`` while it
  keeps exiting within ``STABLE_AFTER`` seconds of its start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from almanet.loops import within

logger = logging.getLogger("almanet")

RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 30.0
STABLE_AFTER = 10.0
_PASSED_ON = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# The exit statuses of a worker that stopped, or that the signal ended before it set its handlers.
_STOPPED_BY_SIGNAL = (0, -signal.SIGTERM, -signal.SIGINT)


async def supervise(command: list[str], count: int) -> int:
    """Run ``count`` workers, each the process ``command``, until SIGINT or SIGTERM; the exit status."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    workers: dict[int, asyncio.subprocess.Process] = {}

    def pass_on(signal_number: int) -> None:
        if not stopping.is_set():
            logger.info("stopping %d workers (a second SIGINT or SIGTERM stops them at once)", count)
        stopping.set()
        for worker in workers.values():
            if worker.returncode is None:
                worker.send_signal(signal.SIGTERM if signal_number == signal.SIGHUP else signal_number)

    for signal_number in _PASSED_ON:
        loop.add_signal_handler(signal_number, pass_on, signal_number)

    async def keep_running(number: int) -> int:
        delay = RESTART_DELAY
        while True:
            started = loop.time()
            worker = workers[number] = await asyncio.create_subprocess_exec(*command, start_new_session=True)
            if stopping.is_set():  # the signal came while it started
                worker.send_signal(signal.SIGTERM)
            logger.info("worker %d of %d started: pid %d", number, count, worker.pid)
            code = await worker.wait()
            if stopping.is_set():
                # Told to stop before its own handlers were set, it ended by the signal: stopped all the same.
                return 0 if code in _STOPPED_BY_SIGNAL else code
            if loop.time() - started >= STABLE_AFTER:
                delay = RESTART_DELAY
            logger.warning(
                "worker %d (pid %d) exited with %d: starting it again in %g s", number, worker.pid, code, delay
            )
            with contextlib.suppress(asyncio.TimeoutError):
                await within(stopping.wait(), delay)
            if stopping.is_set():
                return code
            delay = min(2 * delay, MAX_RESTART_DELAY)

    try:
        codes = await asyncio.gather(*(keep_running(number) for number in range(1, count + 1)))
    finally:
        for signal_number in _PASSED_ON:
            loop.remove_signal_handler(signal_number)
    return 0 if all(code == 0 for code in codes) else 1
