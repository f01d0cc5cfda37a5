"""nsqlookupd's ``/lookup``: which nsqd instances have a topic."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import quote

from almanet.wire.addresses import split_address
from almanet.wire.errors import ConnectionFailed


def http_host_port(address: str) -> tuple[str, int]:
    """``host:port`` or ``http://host:port`` → (host, port); ``ValueError`` saying how to write it."""
    host_port = address[len("http://") :] if address.startswith("http://") else address
    try:
        return split_address(host_port.rstrip("/"))
    except ValueError:
        raise ValueError(
            f"nsqlookupd address {address!r} is not http://host:port (with a port): write e.g. http://127.0.0.1:4161"
        ) from None


async def lookup(address: str, topic: str, timeout: float = 5.0) -> list[str]:
    """The TCP addresses (``host:port``) of the nsqd instances nsqlookupd lists for ``topic``.

    An unknown topic gives an empty list; an unreachable nsqlookupd or a bad
    answer raises ``ConnectionError``.
    """
    host, port = http_host_port(address)
    try:
        status, body = await asyncio.wait_for(_get(host, port, f"/lookup?topic={quote(topic)}"), timeout)
    except (OSError, asyncio.TimeoutError) as error:
        raise ConnectionFailed(f"nsqlookupd at {address} unreachable: {error or 'timed out'}") from error
    if status == 404:
        return []  # TOPIC_NOT_FOUND: no nsqd has the topic yet
    try:
        if status != 200:
            raise ValueError(f"status {status}")
        producers = json.loads(body)["producers"]
        return [f"{producer['broadcast_address']}:{producer['tcp_port']}" for producer in producers]
    except (ValueError, KeyError, TypeError) as error:
        raise ConnectionFailed(f"nsqlookupd at {address} answered /lookup badly: {error}") from error


async def _get(host: str, port: int, path: str) -> tuple[int, bytes]:
    """A bare HTTP/1.0 GET: status and body (the server closes the connection after it)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nAccept: application/json\r\n\r\n".encode())
        response = await reader.read()
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split(b" ")
    if len(status_line) < 2 or not status_line[1].isdigit():
        raise ConnectionFailed(f"not an HTTP response from {host}:{port}")
    return int(status_line[1]), body
