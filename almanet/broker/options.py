"""Settings of the embedded broker: nsqd's flags, names and defaults.

Durations are seconds (float) in Python and Go durations (``60s``, ``15m``,
``250ms``) on the command line, as nsqd takes them.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

from almanet.broker.tls import CLIENT_AUTH_POLICIES, TLS_VERSIONS
from almanet.wire.addresses import split_address
from almanet.wire.protocol import DEFAULT_MAX_BODY_SIZE, DEFAULT_MAX_MSG_SIZE, DEFAULT_MAX_REQ_TIMEOUT_MS


def _option(default: Any, help: str, parse: Callable[[str], Any] | None = None) -> Any:  # noqa: A002
    """A field with nsqd's flag text, which ``almanet broker --help`` shows; ``parse`` reads its flag's value."""
    metadata: dict[str, Any] = {"help": help}
    if parse is not None:
        metadata["parse"] = parse
    return dataclasses.field(default=default, metadata=metadata)


# Go's strconv.ParseBool, which reads nsqd's boolean flags (``-snappy=false``).
_GO_BOOLEANS = {
    **dict.fromkeys(("1", "t", "T", "TRUE", "true", "True"), True),
    **dict.fromkeys(("0", "f", "F", "FALSE", "false", "False"), False),
}


def parse_bool(text: str) -> bool:
    """A boolean flag's value as Go reads it: ``true``, ``false``, ``1``, ``0``, ``t``, ``f``, ..."""
    try:
        return _GO_BOOLEANS[text]
    except KeyError:
        raise ValueError(f"invalid boolean value {text!r} (true or false)") from None


def parse_tls_required(text: str) -> bool | str:
    """``--tls-required``'s value: a boolean, or ``tcp-https`` (TLS for TCP clients, not for HTTP)."""
    if text.lower() == "tcp-https":
        return "tcp-https"
    return parse_bool(text)


@dataclasses.dataclass(frozen=True)
class BrokerOptions:
    """nsqd's options that apply to a single-node in-memory broker, with its defaults.

    ``tcp_address`` and ``http_address`` listen on loopback unless told
    otherwise (``0.0.0.0:4150`` for every interface, as nsqd's defaults);
    port 0 takes a free port, and the broker reports the ports it bound. ``mem_queue_size`` bounds every
    topic's and channel's queue: nsqd spills to disk beyond it, this broker
    refuses the publish (``E_PUB_FAILED``) instead of losing messages; an
    ephemeral topic or channel drops what it cannot hold, as nsqd's do.
    TLS (``tls_*``), compression (``snappy``, ``deflate``) and auth
    (``auth_http_address``) are nsqd's, checked as nsqd checks them at start.
    """

    tcp_address: str = _option(
        "127.0.0.1:4150", "<addr>:<port> to listen on for TCP clients (0.0.0.0:4150: on every interface)"
    )
    http_address: str = _option(
        "127.0.0.1:4151", "<addr>:<port> to listen on for HTTP clients (0.0.0.0:4151: on every interface)"
    )
    broadcast_address: str = _option(
        "", "address given to clients by /lookup (default: the TCP address's host if loopback, else the hostname)"
    )
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
    max_deflate_level: int = _option(
        6, "max deflate compression level a client can negotiate (> values == > nsqd CPU usage)"
    )
    deflate: bool = _option(True, "enable deflate feature negotiation (client compression)")
    snappy: bool = _option(True, "enable snappy feature negotiation (client compression)")
    tls_cert: str = _option("", "path to certificate file")
    tls_key: str = _option("", "path to key file")
    tls_client_auth_policy: str = _option(
        "", "client certificate auth policy ('require' or 'require-verify'); implies --tls-required"
    )
    tls_root_ca_file: str = _option("", "path to certificate authority file")
    tls_required: bool | str = _option(
        False, "require TLS for client connections (true, false, tcp-https: not for HTTP)", parse_tls_required
    )
    tls_min_version: str = _option("tls1.0", "minimum TLS version acceptable (tls1.0, tls1.1, tls1.2 or tls1.3)")
    auth_http_address: str = _option("", "<addr>:<port> or a full url to query auth server (several: comma-separated)")
    http_client_connect_timeout: float = _option(2.0, "timeout for HTTP connect (to the auth server)")
    http_client_request_timeout: float = _option(5.0, "timeout for HTTP request (to the auth server)")

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
        if not 1 <= self.max_deflate_level <= 9:
            raise ValueError("max_deflate_level must be [1,9]")
        tls_required = self.tls_required
        if isinstance(tls_required, str):
            object.__setattr__(self, "tls_required", parse_tls_required(tls_required))
        elif not isinstance(tls_required, bool):
            raise ValueError("tls_required must be true, false or 'tcp-https'")
        if self.tls_client_auth_policy not in CLIENT_AUTH_POLICIES:
            raise ValueError("tls_client_auth_policy must be 'require' or 'require-verify' (or empty)")
        min_version = self.tls_min_version.lower() or "tls1.0"
        if min_version not in TLS_VERSIONS:
            raise ValueError(f"unknown tls_min_version {self.tls_min_version!r} (tls1.0, tls1.1, tls1.2 or tls1.3)")
        object.__setattr__(self, "tls_min_version", min_version)
        if self.tls_required_mode and not (self.tls_cert or self.tls_key):
            raise ValueError("cannot require TLS client connections without TLS key and cert")
        for name in ("http_client_connect_timeout", "http_client_request_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")

    @property
    def tls_required_mode(self) -> bool | str:
        """Whether TLS is required: ``--tls-required``, which ``--tls-client-auth-policy`` implies (as nsqd)."""
        return self.tls_required or bool(self.tls_client_auth_policy)

    @property
    def auth_http_addresses(self) -> list[str]:
        """The auth servers of ``--auth-http-address``; auth is enabled when there are any."""
        return [address.strip() for address in self.auth_http_address.split(",") if address.strip()]


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
