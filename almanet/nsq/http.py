"""A bare HTTP/1.0 client for the HTTP APIs of nsqd and nsqlookupd: small JSON answers, one request per connection."""

from __future__ import annotations

import asyncio

from almanet.loops import within
from almanet.wire.errors import ConnectionFailed


async def request(host: str, port: int, path: str, *, method: str = "GET", timeout: float) -> tuple[int, bytes]:
    """The status and body of ``method path``; ``ConnectionFailed`` when unreachable, too slow, or not HTTP.

    Its message says what went wrong, for the caller to say where: ``f"nsqd at {address} {error}"``.
    """
    try:
        return await within(_request(host, port, method, path), timeout)
    except (OSError, asyncio.TimeoutError) as error:
        raise ConnectionFailed(f"unreachable: {error or 'timed out'}") from error


async def _request(host: str, port: int, method: str, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            f"{method} {path} HTTP/1.0\r\nHost: {host}:{port}\r\nAccept: application/json\r\n"
            f"Content-Length: 0\r\n\r\n".encode()
        )
        response = await reader.read()  # the server closes the connection after it
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split(b" ")
    if len(status_line) < 2 or not status_line[1].isdigit():
        raise ConnectionFailed("answered with something other than HTTP")
    return int(status_line[1]), body
