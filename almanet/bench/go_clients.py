"""NSQ's own Go benchmark clients, ``bench_writer`` and ``bench_reader``: what a broker gives Go clients.

They come with NSQ's source (``bench/``), not with its releases: they are found
in the directory ``ALMANET_NSQ_BENCH`` names, beside the nsqd binary, or on
``PATH``. Each runs for a while with one connection per core and logs one line,
``duration: 2.0s - 109.234mb/s - 572702.552ops/s - 1.746us/op``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess

_RESULT = re.compile(r"duration: \S+ - [\d.]+mb/s - ([\d.]+)ops/s")


@dataclasses.dataclass(frozen=True)
class GoClients:
    writer: str  # path of bench_writer
    reader: str  # path of bench_reader

    def write(self, tcp_address: str, topic: str, seconds: float, size: int, batch: int) -> float:
        """Messages per second bench_writer publishes to ``topic`` in MPUBs of ``batch``, for ``seconds``."""
        return _run(self.writer, tcp_address, topic, seconds, f"-size={size}", f"-batch-size={batch}")

    def read(self, tcp_address: str, topic: str, seconds: float, size: int) -> float:
        """Messages per second bench_reader consumes (RDY 2500, a FIN each) from ``topic``, channel ``ch``."""
        return _run(self.reader, tcp_address, topic, seconds, f"-size={size}", "-channel=ch")


def find_go_clients(nsqd: str | None) -> GoClients | None:
    """bench_writer and bench_reader from ``ALMANET_NSQ_BENCH``, beside ``nsqd`` or on ``PATH``; None if missing."""
    for directory in (os.environ.get("ALMANET_NSQ_BENCH"), nsqd and os.path.dirname(nsqd)):
        if directory:
            clients = GoClients(os.path.join(directory, "bench_writer"), os.path.join(directory, "bench_reader"))
            if os.access(clients.writer, os.X_OK) and os.access(clients.reader, os.X_OK):
                return clients
    writer, reader = shutil.which("bench_writer"), shutil.which("bench_reader")
    return GoClients(writer, reader) if writer and reader else None


def _run(executable: str, tcp_address: str, topic: str, seconds: float, *flags: str) -> float:
    done = subprocess.run(
        [executable, f"-nsqd-tcp-address={tcp_address}", f"-topic={topic}", f"-runfor={seconds:.3f}s", *flags],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
        check=True,
    )
    found = _RESULT.search(done.stderr)
    if found is None:
        raise RuntimeError(f"{os.path.basename(executable)} printed no result:\n{done.stderr}")
    return float(found[1])
