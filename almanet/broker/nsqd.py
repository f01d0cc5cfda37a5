"""A real nsqd in a process of its own, for tests and benchmarks: found, started, stopped.

nsqd is the production broker; where it is installed, almanet's pytest plugin
and ``almanet bench`` run on it as well as on the embedded broker. The binary
is the one ``ALMANET_NSQD`` names, else ``nsqd`` on ``PATH``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from typing import IO

# How long a broker process may take to say where it listens.
START_TIMEOUT = 30.0


def find_nsqd() -> str | None:
    """The nsqd binary to start: ``ALMANET_NSQD``, else ``nsqd`` on ``PATH``; None when there is none."""
    named = os.environ.get("ALMANET_NSQD")
    if named:
        if not os.access(named, os.X_OK):
            raise RuntimeError(f"ALMANET_NSQD={named} is not an executable")
        return named
    return shutil.which("nsqd")


@contextlib.contextmanager
def nsqd_process(executable: str, *flags: str) -> Iterator[tuple[str, str]]:
    """nsqd on free loopback ports with a temporary data path, and ``flags`` (which override those); stopped on exit.

    Yields its TCP and HTTP addresses. Its HTTPS listener, which it opens when
    given a TLS certificate (on 0.0.0.0:4152 by default), takes a free port too.
    """
    with tempfile.TemporaryDirectory(prefix="almanet-nsqd-") as data_path:
        command = [executable, "-tcp-address=127.0.0.1:0", "-http-address=127.0.0.1:0",
                   "-https-address=127.0.0.1:0", "-broadcast-address=127.0.0.1", f"-data-path={data_path}",
                   *flags]  # fmt: skip
        with broker_process(command) as addresses:
            yield addresses


@contextlib.contextmanager
def broker_process(command: list[str], env: dict[str, str] | None = None) -> Iterator[tuple[str, str]]:
    """An NSQ broker (nsqd, or ``almanet broker``) run as ``command``, its TCP and HTTP addresses; stopped on exit."""
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        assert process.stderr is not None
        addresses = listening_addresses(process, process.stderr)
        # Its log goes on being read, so that it never blocks writing it.
        threading.Thread(target=process.stderr.read, name="broker-log", daemon=True).start()
        yield addresses
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def listening_addresses(process: subprocess.Popen[str], log: IO[str]) -> tuple[str, str]:
    """The TCP and HTTP addresses a broker logs it listens on (``TCP: listening on 127.0.0.1:39693``), in any order.

    ``RuntimeError`` when it ends or does not say within ``START_TIMEOUT`` (it is killed then).
    """
    found: dict[str, str] = {}
    lines: list[str] = []
    timer = threading.Timer(START_TIMEOUT, process.kill)  # a read that never ends ends with the process
    timer.start()
    try:
        for line in log:
            lines.append(line)
            for kind in ("TCP", "HTTP"):
                if f"{kind}: listening on " in line:
                    found[kind] = line.rsplit(" ", 1)[1].strip()
            if len(found) == 2:
                return found["TCP"], found["HTTP"]
    finally:
        timer.cancel()
    raise RuntimeError(f"{command_name(process)} did not start:\n{''.join(lines[-20:])}")


def command_name(process: subprocess.Popen[str]) -> str:
    args = process.args
    return str(args[0] if isinstance(args, list) else args)
