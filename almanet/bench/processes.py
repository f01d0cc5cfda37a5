"""The bench's child processes: free loopback ports, waiting for a process to start, its CPU time, stopping it."""

from __future__ import annotations

import concurrent.futures
import os
import socket
import subprocess
from collections.abc import Callable
from typing import IO, Any

# How long a process of the bench may take to start.
START_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for_line(process: subprocess.Popen[str], stream: IO[str], predicate: Callable[[str], bool]) -> str:
    """The first line of the process's ``stream`` that ``predicate`` accepts, within START_TIMEOUT.

    ``RuntimeError`` if the process ends first or is silent that long (it is killed then).
    """
    with concurrent.futures.ThreadPoolExecutor(1) as reader:
        found = reader.submit(lambda: next((line for line in stream if predicate(line)), None))
        try:
            line = found.result(START_TIMEOUT)
        except concurrent.futures.TimeoutError:
            process.kill()  # which ends the reading too
            raise RuntimeError(f"{process.args!r} did not start within {START_TIMEOUT:g} s") from None
    if line is None:
        raise RuntimeError(f"{process.args!r} ended before it started")
    return line


def cpu_seconds(pid: int) -> float:
    """The CPU time process ``pid`` has used so far, user and system, from /proc/<pid>/stat (Linux)."""
    with open(f"/proc/{pid}/stat") as stat:
        # After the command's name, in parentheses (which it may contain): utime and stime are fields 14 and 15.
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop(process: subprocess.Popen[Any]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
