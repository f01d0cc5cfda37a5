"""The brokers the bench measures on: almanet's embedded broker, nsqd, and nats-server for NATS.

Each one runs in a process of its own on free loopback ports, started here
and stopped on exit, except an nsqd that is already running (``--nsqd``,
``ALMANET_TEST_NSQD``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

from almanet.bench.processes import stop, wait_for_line
from almanet.broker.nsqd import Cluster, broker_process

# nsqd's own flags for the bench: every workload's messages fit in memory (bench_writer publishes over 1M a
# second), as in the embedded broker, which is given the same --mem-queue-size.
NSQD_FLAGS = ("-mem-queue-size=10000000",)

_topic_numbers = itertools.count()


def name_prefix() -> str:
    """What the name of every topic, service and subject of this process's bench starts with."""
    return f"bench.{os.getpid()}."


@dataclasses.dataclass
class Broker:
    """A running NSQ broker: ``name`` is ``embedded`` or ``nsqd``; ``pid`` that of an nsqd the bench started."""

    name: str
    tcp_address: str
    http_address: str
    pid: int | None = None
    _topics: list[str] = dataclasses.field(default_factory=list)

    def fresh_topic(self) -> str:
        """A new topic name; the topics handed out before are deleted, so that no workload pays for another's."""
        while self._topics:
            self._delete_topic(self._topics.pop())
        topic = f"{name_prefix()}{next(_topic_numbers)}"
        self._topics.append(topic)
        return topic

    def delete_topics(self, prefix: str) -> None:
        """Delete every topic whose name starts with ``prefix``."""
        for topic in self._stats()["topics"]:
            if topic["topic_name"].startswith(prefix):
                self._delete_topic(topic["topic_name"])

    def channel_depth(self, topic: str, channel: str) -> int:
        """Messages waiting in ``topic``'s ``channel``, not yet sent to a consumer."""
        depth: int = next(
            found["depth"]
            for found_topic in self._stats(topic=topic, channel=channel)["topics"]
            if found_topic["topic_name"] == topic
            for found in found_topic["channels"]
            if found["channel_name"] == channel
        )
        return depth

    def _stats(self, **query: str) -> Any:
        query_string = urllib.parse.urlencode({"format": "json", **query})
        with urllib.request.urlopen(f"http://{self.http_address}/stats?{query_string}", timeout=30) as response:
            return json.load(response)

    def _delete_topic(self, topic: str) -> None:
        query = urllib.parse.urlencode({"topic": topic})
        request = urllib.request.Request(f"http://{self.http_address}/topic/delete?{query}", method="POST")
        with contextlib.suppress(urllib.error.HTTPError):  # never created
            urllib.request.urlopen(request, timeout=30).close()


@contextlib.contextmanager
def embedded_broker(env: dict[str, str] | None = None) -> Iterator[Broker]:
    """``almanet broker`` in a process of its own, with room for every workload's messages in memory."""
    command = [sys.executable, "-m", "almanet", "broker", "--tcp-address=127.0.0.1:0", "--http-address=127.0.0.1:0",
               "--mem-queue-size=10000000"]  # fmt: skip
    with broker_process(command, env) as addresses:
        yield Broker("embedded", *addresses)


@contextlib.contextmanager
def nsqd(executable: str) -> Iterator[Broker]:
    """nsqd with NSQD_FLAGS and a temporary data path, its pid known (its CPU time is read from /proc).

    It is a ``Cluster`` of one node without nsqlookupd (whose executable is
    then never run), as the cluster section's one nsqd: the same command line
    as ``nsqd_process``'s, which does not give the process.
    """
    with Cluster(executable, "", nodes=1, lookupds=0, nsqd_flags=NSQD_FLAGS) as single:
        node = single.nodes[0]
        assert node is not None
        yield Broker("nsqd", node.tcp_address, node.http_address, node.process.pid)


def running_nsqd(tcp_address: str, http_address: str | None = None) -> Broker:
    """An nsqd that runs already; its HTTP address is, unless given, nsqd's default: the TCP port + 1."""
    host, _, port = tcp_address.rpartition(":")
    http_address = http_address or f"{host}:{int(port) + 1}"
    try:
        with urllib.request.urlopen(f"http://{http_address}/info", timeout=10) as response:
            info = json.load(response)
    except (OSError, ValueError) as error:
        raise RuntimeError(f"no nsqd HTTP API at {http_address}: give nsqd's HTTP address ({error})") from None
    if info.get("tcp_port") != int(port):
        raise RuntimeError(f"the nsqd at {http_address} is not the one at {tcp_address}: give its HTTP address")
    return Broker("nsqd", tcp_address, http_address)


def nats_available() -> bool:
    """Whether NATS can be measured: nats-server on PATH and nats-py installed."""
    try:
        importlib.metadata.version("nats-py")
    except importlib.metadata.PackageNotFoundError:
        return False
    return shutil.which("nats-server") is not None


@contextlib.contextmanager
def nats_server() -> Iterator[str]:
    """nats-server with JetStream (its store in a temporary directory); yields its ``host:port``."""
    with tempfile.TemporaryDirectory(prefix="almanet-bench-nats-") as store:
        command = ["nats-server", "-a", "127.0.0.1", "-p", "-1", "-js", "-sd", store]
        with _logging_process(command) as process:
            address = _logged_address(process, "Listening for client connections on")
            _read_log_on(process)
            yield address


@contextlib.contextmanager
def _logging_process(command: list[str], env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    """``command`` running, its log (stderr) readable; stopped on exit."""
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        yield process
    finally:
        stop(process)


def _logged_address(process: subprocess.Popen[str], marker: str) -> str:
    """The address at the end of the first line of the process's log with ``marker``."""
    assert process.stderr is not None
    return wait_for_line(process, process.stderr, lambda line: marker in line).rsplit(" ", 1)[1].strip()


def _read_log_on(process: subprocess.Popen[str]) -> None:
    """Go on reading the process's log, so that it never blocks writing it."""
    assert process.stderr is not None
    threading.Thread(target=process.stderr.read, daemon=True).start()
