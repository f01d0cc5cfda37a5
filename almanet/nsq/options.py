"""What a connection to nsqd is opened with: ``ConnectionOptions``.

What IDENTIFY tells nsqd (``identify_body``), the TLS context (its files are
loaded when the options are made) and the client's own limits and timeouts.
"""

from __future__ import annotations

import functools
import socket
import ssl
from dataclasses import dataclass
from typing import Any

from almanet._version import __version__
from almanet.wire.compression import SNAPPY_MISSING, snappy_available
from almanet.wire.protocol import DEFAULT_MAX_BODY_SIZE, DEFAULT_MAX_FRAME_SIZE, DEFAULT_MAX_MSG_SIZE

# With deflate and output_buffer_size -1: the output buffer timeout asked for instead, nsqd's
# --min-output-buffer-timeout by default (see ConnectionOptions.identify_body).
DEFLATE_OUTPUT_BUFFER_TIMEOUT = 0.025


@dataclass(frozen=True)
class ConnectionOptions:
    """What a client tells nsqd in IDENTIFY, and its own limits and reconnection policy.

    Durations are seconds. ``msg_timeout`` None keeps nsqd's default;
    ``auth_secret`` is sent when nsqd says auth is required.

    ``output_buffer_size`` -1 (the default) has nsqd write each message to
    the socket at once. With a buffer (0: nsqd's default of 16 KiB, or 64
    bytes up to nsqd's ``--max-output-buffer-size``), nsqd holds messages to
    a consumer with RDY to spare until the buffer fills, it answers a
    command, or ``output_buffer_timeout`` (None: nsqd's default of 250 ms)
    ticks: fewer writes for nsqd, up to that long a wait for each message
    when traffic is light.

    ``max_msg_size`` and ``max_body_size`` are nsqd's limits (its flags of
    those names): publishes beyond them are refused before they are sent.
    ``max_reconnect_interval`` caps the backoff between reconnection attempts.

    TLS (nsqd's ``--tls-cert`` and ``--tls-key``) is used when ``tls`` is
    true or any of ``tls_context``, ``tls_ca_file``, ``tls_cert_file`` is
    given: the connection is upgraded after IDENTIFY, and refused if nsqd
    does not offer TLS. ``tls_ca_file`` (PEM) holds the CAs that nsqd's
    certificate must be signed by (default: the system's);
    ``tls_cert_file`` and ``tls_key_file`` (PEM; the key may be in the
    certificate's file) are the client certificate, for nsqd's
    ``--tls-client-auth-policy``. nsqd's certificate must name the host it
    is connected to, or ``tls_server_hostname``. ``tls_context``: an
    ``ssl.SSLContext`` of the caller's instead of those three. ``snappy``
    or ``deflate`` (at ``deflate_level``, 1 to 9, capped by nsqd's
    ``--max-deflate-level``) compress the connection both ways when nsqd
    agrees (its ``--snappy`` and ``--deflate``, on by default); snappy needs
    ``pip install 'almanet[snappy]'``. nsqd flushes its deflate stream with
    its output buffer only: with deflate, ``output_buffer_size`` -1 asks for
    nsqd's default buffer flushed every ``output_buffer_timeout`` (None:
    ``DEFLATE_OUTPUT_BUFFER_TIMEOUT``, 25 ms) instead, that long a wait for
    a message when traffic is light. ``auth_secret`` is sent after them.
    """

    client_id: str = socket.gethostname().split(".")[0]
    hostname: str = socket.gethostname()
    user_agent: str = f"almanet/{__version__}"
    heartbeat_interval: float = 30.0
    msg_timeout: float | None = None
    output_buffer_size: int = -1
    output_buffer_timeout: float | None = None
    sample_rate: int = 0
    auth_secret: str | bytes | None = None
    tls: bool = False
    tls_context: ssl.SSLContext | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_server_hostname: str | None = None
    snappy: bool = False
    deflate: bool = False
    deflate_level: int = 6
    connect_timeout: float = 5.0
    max_reconnect_interval: float = 1.0
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    max_msg_size: int = DEFAULT_MAX_MSG_SIZE
    max_body_size: int = DEFAULT_MAX_BODY_SIZE

    def __post_init__(self) -> None:
        if self.output_buffer_size != -1 and self.output_buffer_size < 0:
            raise ValueError("output_buffer_size must be -1 (none), 0 (nsqd's default) or a size in bytes")
        for name in ("connect_timeout", "max_reconnect_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        for name in ("max_frame_size", "max_msg_size", "max_body_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.snappy and self.deflate:
            raise ValueError("nsqd compresses a connection one way: snappy or deflate, not both")
        if not 1 <= self.deflate_level <= 9:
            raise ValueError(f"deflate_level must be 1 to 9, not {self.deflate_level}")
        if self.snappy and not snappy_available():
            raise ImportError(SNAPPY_MISSING)
        if self.tls_context is not None and (self.tls_ca_file or self.tls_cert_file or self.tls_key_file):
            raise ValueError("give tls_context, or tls_ca_file, tls_cert_file and tls_key_file: not both")
        if self.tls_key_file and not self.tls_cert_file:
            raise ValueError("tls_key_file is the key of tls_cert_file: give the certificate too")
        self.ssl_context  # noqa: B018 - the files are loaded now: a wrong one is an error here, not at connect time

    @property
    def uses_tls(self) -> bool:
        """Whether connections ask nsqd for TLS (and refuse to go on without it)."""
        return self.tls or self.tls_context is not None or bool(self.tls_ca_file or self.tls_cert_file)

    @functools.cached_property
    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context connections upgrade with: ``tls_context``, or one made of the files; None without TLS."""
        if self.tls_context is not None or not self.uses_tls:
            return self.tls_context
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.tls_ca_file)
            if self.tls_cert_file:
                context.load_cert_chain(self.tls_cert_file, self.tls_key_file)
        except OSError as error:  # ssl.SSLError too
            files = {"tls_ca_file": self.tls_ca_file, "tls_cert_file": self.tls_cert_file}
            files["tls_key_file"] = self.tls_key_file
            named = ", ".join(f"{name}={path!r}" for name, path in files.items() if path)
            raise ValueError(f"cannot load the TLS files ({named}): {error}") from error
        return context

    def identify_body(self) -> dict[str, Any]:
        buffer_size, buffer_timeout = self.output_buffer_size, self.output_buffer_timeout
        if self.deflate and buffer_size == -1:
            # nsqd flushes its deflate stream when it flushes its output buffer: without one, a
            # message would wait for the next heartbeat. So a buffer flushed as often as nsqd allows.
            buffer_size, buffer_timeout = 0, buffer_timeout or DEFLATE_OUTPUT_BUFFER_TIMEOUT
        body: dict[str, Any] = {
            "client_id": self.client_id,
            "hostname": self.hostname,
            "user_agent": self.user_agent,
            "feature_negotiation": True,
            "heartbeat_interval": round(self.heartbeat_interval * 1000),
            "output_buffer_size": buffer_size,
            "sample_rate": self.sample_rate,
        }
        if buffer_timeout is not None:
            body["output_buffer_timeout"] = round(buffer_timeout * 1000)
        if self.msg_timeout is not None:
            body["msg_timeout"] = round(self.msg_timeout * 1000)
        if self.uses_tls:
            body["tls_v1"] = True
        if self.snappy:
            body["snappy"] = True
        if self.deflate:
            body["deflate"] = True
            body["deflate_level"] = self.deflate_level
        return body


class NsqdLimits:
    """What nsqd said of its limits, beyond the options: shared by a producer's or a consumer's connections.

    nsqd does not tell its --max-msg-size; it states it when it refuses a
    message as too big, and later ones fail before they are sent.
    """

    __slots__ = ("max_msg_size",)

    def __init__(self, options: ConnectionOptions) -> None:
        self.max_msg_size = options.max_msg_size

    def refused_as_too_big(self, limit: int) -> None:
        self.max_msg_size = min(self.max_msg_size, limit)
