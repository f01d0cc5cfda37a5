"""A real nsqd in a process of its own, for tests and benchmarks: found, started, stopped; or a cluster of them.

nsqd is the production broker; where it is installed, almanet's pytest plugin
and ``almanet bench`` run on it as well as on the embedded broker. The binary
is the one ``ALMANET_NSQD`` names, else ``nsqd`` on ``PATH``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from typing import IO

# How long a broker process may take to say where it listens.
START_TIMEOUT = 30.0


def find_nsqd() -> str | None:
    """The nsqd binary to start: ``ALMANET_NSQD``, else ``nsqd`` on ``PATH``; None when there is none."""
    return _named_executable("ALMANET_NSQD") or shutil.which("nsqd")


def find_nsqlookupd() -> str | None:
    """The nsqlookupd binary: ``ALMANET_NSQLOOKUPD``, else the one beside nsqd, else on ``PATH``; None: none."""
    named = _named_executable("ALMANET_NSQLOOKUPD")
    if named:
        return named
    nsqd = find_nsqd()
    beside = os.path.join(os.path.dirname(nsqd), "nsqlookupd") if nsqd else ""
    return beside if beside and os.access(beside, os.X_OK) else shutil.which("nsqlookupd")


def _named_executable(variable: str) -> str | None:
    """The executable the environment ``variable`` names (None: unset); ``RuntimeError`` for one that is not."""
    named = os.environ.get(variable)
    if named and not os.access(named, os.X_OK):
        raise RuntimeError(f"{variable}={named} is not an executable")
    return named or None


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
    process = DaemonProcess(command, env)
    try:
        yield process.tcp_address, process.http_address
    finally:
        process.stop()


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


class DaemonProcess:
    """An NSQ daemon (nsqd, nsqlookupd, ``almanet broker``) run as ``command``: its TCP and HTTP addresses once it
    listens (``RuntimeError`` when it does not say within ``START_TIMEOUT``)."""

    def __init__(self, command: list[str], env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
        )
        self._log_reader: threading.Thread | None = None
        try:
            assert self.process.stderr is not None
            self.tcp_address, self.http_address = listening_addresses(self.process, self.process.stderr)
        except BaseException:
            self.kill()
            raise
        # Its log goes on being read, so that it never blocks writing it.
        self._log_reader = threading.Thread(target=self.process.stderr.read, name="nsq-log", daemon=True)
        self._log_reader.start()

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 10 s): nsqd writes the messages it holds to its data path first."""
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()
        self._close_log()

    def kill(self) -> None:
        """SIGKILL: what nsqd held in memory is gone."""
        self.process.kill()
        self.process.wait()
        self._close_log()

    def _close_log(self) -> None:
        """Once its log is read to the end (the process ended), close the pipe."""
        reader = self._log_reader  # None when the process did not start
        if reader is not None:
            reader.join(5)
        if self.process.stderr is not None and (reader is None or not reader.is_alive()):
            self.process.stderr.close()


class Cluster:
    """NSQ as it is deployed, on loopback: ``lookupds`` nsqlookupd and ``nodes`` nsqd registering with each.

    Every daemon takes free ports; an nsqd stopped (``stop_node``) or killed
    (``kill_node``) starts again on the same ports and data path
    (``start_node``), and ``add_node`` starts one more. Use as a context
    manager: everything is stopped on exit.
    """

    def __init__(
        self, nsqd: str, nsqlookupd: str, *, nodes: int = 3, lookupds: int = 2, nsqd_flags: Sequence[str] = ()
    ) -> None:
        self._nsqd = nsqd
        self._nsqd_flags = nsqd_flags
        self._data = tempfile.TemporaryDirectory(prefix="almanet-cluster-")
        self.lookupds: list[DaemonProcess] = []
        self.nodes: list[DaemonProcess | None] = []
        self._node_addresses: list[tuple[str, str]] = []
        try:
            for _ in range(lookupds):
                self.lookupds.append(
                    DaemonProcess([nsqlookupd, "-tcp-address=127.0.0.1:0", "-http-address=127.0.0.1:0"])
                )
            for _ in range(nodes):
                self.add_node()
        except BaseException:
            self.close()
            raise

    @property
    def lookupd_http(self) -> list[str]:
        """nsqlookupd's HTTP addresses, as sessions and services take them (``http://host:port``)."""
        return [f"http://{lookupd.http_address}" for lookupd in self.lookupds]

    def tcp(self, index: int) -> str:
        """Node ``index``'s TCP address (running or not)."""
        return self._node_addresses[index][0]

    def http(self, index: int) -> str:
        return self._node_addresses[index][1]

    def add_node(self) -> int:
        """Start one more nsqd (on free ports); its index, once every nsqlookupd lists it."""
        self.nodes.append(None)
        self._node_addresses.append(("127.0.0.1:0", "127.0.0.1:0"))
        index = len(self.nodes) - 1
        os.mkdir(os.path.join(self._data.name, str(index)))
        self.start_node(index)
        return index

    def start_node(self, index: int) -> None:
        """Start nsqd ``index`` again, on its ports and data path; returns once every nsqlookupd lists it."""
        if self.nodes[index] is not None:
            raise RuntimeError(f"nsqd {index} is running")
        tcp, http = self._node_addresses[index]
        command = [self._nsqd, f"-tcp-address={tcp}", f"-http-address={http}", "-https-address=127.0.0.1:0",
                   "-broadcast-address=127.0.0.1", f"-data-path={os.path.join(self._data.name, str(index))}",
                   *(f"-lookupd-tcp-address={lookupd.tcp_address}" for lookupd in self.lookupds),
                   *self._nsqd_flags]  # fmt: skip
        node = self.nodes[index] = DaemonProcess(command)
        self._node_addresses[index] = (node.tcp_address, node.http_address)
        self.wait_until_listed(node.tcp_address, True)

    def stop_node(self, index: int) -> None:
        """SIGTERM nsqd ``index`` (it keeps what it holds on disk); returns once no nsqlookupd lists it."""
        node, self.nodes[index] = self.nodes[index], None
        if node is not None:
            node.stop()
            self.wait_until_listed(node.tcp_address, False)

    def kill_node(self, index: int) -> None:
        """SIGKILL nsqd ``index``; returns once no nsqlookupd lists it."""
        node, self.nodes[index] = self.nodes[index], None
        if node is not None:
            node.kill()
            self.wait_until_listed(node.tcp_address, False)

    def listed(self, lookupd: DaemonProcess) -> set[str]:
        """The TCP addresses of the nsqd ``lookupd`` lists in /nodes."""
        with urllib.request.urlopen(f"http://{lookupd.http_address}/nodes", timeout=5) as response:
            producers = json.load(response)["producers"]
        return {f"{producer['broadcast_address']}:{producer['tcp_port']}" for producer in producers}

    def wait_until_listed(self, tcp_address: str, listed: bool) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        running = [lookupd for lookupd in self.lookupds if lookupd.process.poll() is None]
        while any((tcp_address in self.listed(lookupd)) != listed for lookupd in running):
            if time.monotonic() > deadline:
                raise RuntimeError(f"nsqlookupd {'never listed' if listed else 'still lists'} nsqd at {tcp_address}")
            time.sleep(0.02)

    def close(self) -> None:
        for node in self.nodes:
            if node is not None:
                node.stop()
        for lookupd in self.lookupds:
            lookupd.stop()
        self.nodes = [None] * len(self.nodes)
        self._data.cleanup()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
