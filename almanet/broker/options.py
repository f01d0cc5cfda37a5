"""Settings of the embedded broker: nsqd's flags, names and defaults.

Durations are seconds (float) in Python and Go durations (``60s``, ``15m``,
``250ms``) on the command line, as nsqd takes them.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from almanet.wire.addresses import split_address
from almanet.wire.protocol import DEFAULT_MAX_BODY_SIZE, DEFAULT_MAX_MSG_SIZE, DEFAULT_MAX_REQ_TIMEOUT_MS


def _option(default: Any, help: str) -> Any:  # noqa: A002
    """A field with nsqd's flag text, which ``almanet broker --help`` shows."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class BrokerOptions:
    """nsqd's options that apply to a single-node in-memory broker, with its defaults.

    ``tcp_address`` and ``http_address`` take port 0 for a free port; the
    broker reports the ports it bound. ``mem_queue_size`` bounds every
    topic's and channel's queue: nsqd spills to disk beyond it, this broker
    refuses the publish (``E_PUB_FAILED``) instead of losing messages; an
    ephemeral topic or channel drops what it cannot hold, as nsqd's do.
    """

    tcp_address: str = _option("0.0.0.0:4150", "<addr>:<port> to listen on for TCP clients")
    http_address: str = _option("0.0.0.0:4151", "<addr>:<port> to listen on for HTTP clients")
    broadcast_address: str = _option("", "address given to clients by /lookup (default: the hostname)")
    mem_queue_size: int = _option(10000, "number of messages a topic or channel holds")
    max_msg_size: int = _option(DEFAULT_MAX_MSG_SIZE, "maximum size of a single message in bytes")
    max_body_size: int = _option(DEFAULT_MAX_BODY_SIZE, "maximum size of a single command body")
    msg_timeout: float = _option(60.0, "default duration to wait before auto-requeing a message")
    max_msg_timeout: float = _option(15 * 60.0, "maximum duration before a message will timeout")
    max_req_timeout: float = _option(DEFAULT_MAX_REQ_TIMEOUT_MS / 1000, "maximum requeuing timeout for a message")
    max_rdy_count: int = _option(2500, "maximum RDY count for a client")
    max_heartbeat_interval: float = _option(60.0, "maximum client configurable duration of time between heartbeats")
    max_output_buffer_size: int = _option(64 * 1024, "maximum client configurable size (in bytes) for an output buffer")
    max_output_buffer_timeout: float = _option(30.0, "maximum client configurable output buffer timeout")
    min_output_buffer_timeout: float = _option(0.025, "minimum client configurable output buffer timeout")
    output_buffer_timeout: float = _option(0.25, "default output buffer timeout")
    max_deflate_level: int = _option(6, "maximum deflate compression level a client can negotiate")

    def __post_init__(self) -> None:
        for name in ("mem_queue_size", "max_msg_size", "max_body_size", "max_rdy_count", "max_output_buffer_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_msg_size > self.max_body_size:
            raise ValueError("max_msg_size must not exceed max_body_size")
        for name in ("msg_timeout", "max_msg_timeout", "max_heartbeat_interval", "output_buffer_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.msg_timeout > self.max_msg_timeout:
            raise ValueError("msg_timeout must not exceed max_msg_timeout")
        if self.max_req_timeout < 0:
            raise ValueError("max_req_timeout must not be negative")
        split_address(self.tcp_address)
        split_address(self.http_address)


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """A Go duration (``1m30s``, ``250ms``, ``0``) in seconds."""
    if text == "0":
        return 0.0
    position = 0
    seconds = 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        seconds += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    if position == 0 or position != len(text):
        raise ValueError(f"invalid duration {text!r} (examples: 250ms, 60s, 15m, 1h)")
    return seconds
