"""What sessions and services take: addresses, keywords, connection options.

The keywords of ``new_session`` and ``new_service`` are ``SessionOptions``;
each connection option may also be given to ``consume`` and to a procedure,
for its own connections (``connection_options``).
"""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import Iterable, Mapping
from typing import Any, TypedDict

from almanet.nsq.lookupd import http_host_port
from almanet.nsq.options import ConnectionOptions
from almanet.wire.addresses import split_address

# What consume() asks of nsqd unless told otherwise: its output buffer (16 KiB),
# flushed at least every 25 ms (nsqd's shortest; its default is 250 ms).
# Measured on nsqd v1.3.0, consuming a backlog with a commit each: 380k msgs/s
# against 50k when every message is written at once, the RPC connections'
# choice (ConnectionOptions.output_buffer_size -1), where a call's latency
# must not wait for a flush. docs/NSQD.md has the measurements.
CONSUME_OUTPUT_BUFFER: dict[str, Any] = {"output_buffer_size": 0, "output_buffer_timeout": 0.025}


def split_addresses(addresses: Iterable[str]) -> tuple[list[str], list[str]]:
    """nsqd TCP addresses (``host:port``) and nsqlookupd HTTP addresses (``http://host:port``)."""
    nsqd: list[str] = []
    lookupd: list[str] = []
    for address in addresses:
        if not isinstance(address, str):
            raise TypeError(f"an address is a str (host:port, or http://host:port), not {type(address).__name__}")
        if address.startswith("http://"):
            http_host_port(address)  # ValueError now, not at the first lookup
            lookupd.append(address)
        elif "://" in address:
            raise ValueError(f"address {address!r}: nsqd's TCP addresses are host:port, nsqlookupd's http://host:port")
        else:
            split_address(address)
            nsqd.append(address)
    if not nsqd:
        raise ValueError("a session needs at least one nsqd TCP address (host:port) to publish to")
    return nsqd, lookupd


class SessionOptions(TypedDict, total=False):
    """The keywords of ``new_session``, ``Session`` (and ``new_service``, ``Service``).

    ``timeout`` and ``lookupd_poll_interval``, then ``ConnectionOptions``'s
    fields, for every connection of the session; ``output_buffer_size`` and ``output_buffer_timeout`` None (the
    default): calls unbuffered, ``consume`` with ``CONSUME_OUTPUT_BUFFER``.
    """

    timeout: float
    lookupd_poll_interval: float
    auth_secret: str | bytes | None
    tls: bool
    tls_context: ssl.SSLContext | None
    tls_ca_file: str | None
    tls_cert_file: str | None
    tls_key_file: str | None
    tls_server_hostname: str | None
    snappy: bool
    deflate: bool
    deflate_level: int
    heartbeat_interval: float
    msg_timeout: float | None
    max_msg_size: int
    max_body_size: int
    max_frame_size: int
    max_reconnect_interval: float
    connect_timeout: float
    output_buffer_size: int | None
    output_buffer_timeout: float | None
    sample_rate: int
    client_id: str
    hostname: str
    user_agent: str


def check_keywords(function: str, options: Mapping[str, object], own: Iterable[str] = ()) -> None:
    """``TypeError`` as Python words it, for a keyword ``function`` does not take (its ``own``, ``SessionOptions``)."""
    for name in options:
        if name not in SessionOptions.__annotations__:
            known = ", ".join([*own, *SessionOptions.__annotations__])
            raise TypeError(f"{function}() got an unexpected keyword argument {name!r}; it takes: {known}")


def connection_options(
    base: ConnectionOptions, overrides: dict[str, Any], function: str, own: Iterable[str] = ()
) -> ConnectionOptions:
    """``base`` with ``overrides``, the keywords ``function`` was given beside its ``own``.

    ``TypeError`` as Python words it for one that is no connection option, listing those ``function`` takes.
    """
    fields = [field.name for field in dataclasses.fields(ConnectionOptions)]
    for name in overrides:
        if name not in fields:
            known = ", ".join([*own, *fields])
            raise TypeError(f"{function}() got an unexpected keyword argument {name!r}; it takes: {known}")
    return dataclasses.replace(base, **overrides) if overrides else base
