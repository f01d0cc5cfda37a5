"""A minimal HTTP/1.1 server that behaves as Go's net/http where a client can tell.

Keep-alive, ``Content-Length`` or chunked request bodies, ``Expect:
100-continue``, and a plain-text 400 (or 417, 431, 501, 505) followed by
closing the connection for a request it cannot parse, in the words of Go
1.19, which nsqd v1.3.0's release is built with. What the requests mean is
the handler's business (nsqd's routes are in ``http``).
"""

from __future__ import annotations

import asyncio
import enum
import re
import time
from typing import Protocol, cast
from urllib.parse import unquote, unquote_plus

from almanet.wire.errors import AlmanetError

# Go's http.DefaultMaxHeaderBytes and the slack it adds (nsqd sets no limit of its own).
_MAX_HEAD = (1 << 20) + 4096
# Go's limit on a chunk-size line.
_MAX_CHUNK_LINE = 4096
# Seconds a connection closed with request bytes unread keeps reading (and dropping)
# them: closing at once would reset it, and the client could lose the reply (Go's
# rstAvoidanceDelay).
_LINGER = 0.5
TEXT = "text/plain; charset=utf-8"
JSON = "application/json; charset=utf-8"
_REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Request Entity Too Large",
    417: "Expectation Failed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
_HEAD_END = re.compile(rb"\n\r?\n")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VERSION = re.compile(r"HTTP/([0-9])\.[0-9]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_BUT_TAB = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_BAD_HOST = re.compile(r"[^0-9A-Za-z!$%&'()*+,\-.:;=\[\]_~]")
_BAD_ESCAPE = re.compile(r"%(?![0-9a-fA-F]{2})")
_CHUNK_SIZE = re.compile(rb"([0-9a-fA-F]{1,16})(?:;.*)?")


class HTTPError(AlmanetError):
    """An nsqd API error: ``{"message": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Unread(enum.Enum):
    """Why a request body was not read; the connection closes after the reply."""

    TOO_BIG = "larger than the route reads"
    MALFORMED = "malformed chunked encoding"


class Response:
    __slots__ = ("allow", "body", "content_type", "nsq_header", "status")

    def __init__(
        self, status: int, body: bytes, content_type: str | None, nsq_header: bool = True, allow: str | None = None
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.nsq_header = nsq_header
        self.allow = allow


class Request:
    """A request as the handlers see it: query and body are looked at on demand, as nsqd does."""

    __slots__ = ("_body", "_query", "_raw_query", "body_read", "content_length", "method", "path")

    def __init__(
        self, method: str, path: str, raw_query: str, content_length: int | None, body: bytes | Unread
    ) -> None:
        self.method = method
        self.path = path
        self.content_length = content_length  # None when chunked
        self._raw_query = raw_query
        self._query: dict[str, str] | None = None
        self._body = body
        self.body_read = False  # the handler read the body (where Go sends 100 Continue)

    @property
    def query(self) -> dict[str, str]:
        """The first value of each parameter; 400 INVALID_REQUEST where Go's ``url.ParseQuery`` fails."""
        if self._query is None:
            try:
                self._query = _parse_query(self._raw_query)
            except ValueError:
                raise HTTPError(400, "INVALID_REQUEST") from None
        return self._query

    def read_body(self) -> bytes | None:
        """The body, None if larger than the route reads; a malformed one fails as nsqd's read does."""
        body = self._body
        self.body_read = body is not Unread.TOO_BIG  # refused by its declared size, unread
        if body is Unread.MALFORMED:
            raise HTTPError(500, "INTERNAL_ERROR")
        return None if body is Unread.TOO_BIG else body


class Handler(Protocol):
    """What answers the requests: nsqd's routes (``http.API``)."""

    def body_limit(self, path: str) -> int:
        """The most the route at ``path`` reads of a body."""
        ...

    def handle(self, request: Request) -> Response: ...


class _BadRequest(AlmanetError):
    """A request Go's HTTP server refuses before any handler sees it; ``detail`` for those it says why."""

    def __init__(self, status: int, detail: str = "") -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail

    def reply(self) -> bytes:
        """Go's reply, which it writes itself: no Date or Content-Length, but for 417."""
        status = f"{self.status} {_REASONS[self.status]}"
        if self.status == 417:
            headers = f"Connection: close\r\nDate: {_http_date()}\r\nContent-Length: 0"
            return f"HTTP/1.1 {status}\r\n{headers}\r\n\r\n".encode()
        if self.detail:
            status += f": {self.detail}"
        body = "Unsupported transfer encoding" if self.status == 501 else status
        return f"HTTP/1.1 {status}\r\nContent-Type: {TEXT}\r\nConnection: close\r\n\r\n{body}".encode()


def _http_date() -> str:
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())


class _Head:
    """A request line and header section, as far as the server needs them."""

    __slots__ = ("content_length", "expects_continue", "http10", "keep_alive", "method", "path", "raw_query")

    def __init__(
        self,
        method: str,
        path: str,
        raw_query: str,
        http10: bool,
        content_length: int | None,
        keep_alive: bool,
        expects_continue: bool,
    ) -> None:
        self.method = method
        self.path = path
        self.raw_query = raw_query
        self.http10 = http10
        self.content_length = content_length  # None when chunked
        self.keep_alive = keep_alive
        self.expects_continue = expects_continue


class _SizedBody:
    """A request body of a declared length."""

    def __init__(self, length: int, limit: int) -> None:
        self._length = length
        self._limit = limit

    def feed(self, buffer: bytearray) -> bytes | Unread | None:
        """The body, taken from the head of ``buffer``; None while incomplete."""
        if self._length > self._limit:
            return Unread.TOO_BIG
        if len(buffer) < self._length:
            return None
        body = bytes(buffer[: self._length])
        del buffer[: self._length]
        return body


class _ChunkedBody:
    """A chunked request body, decoded as its bytes arrive."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._data = bytearray()
        self._chunk_left = 0  # bytes of the current chunk yet to come
        self._in_chunk = False  # from a chunk-size line to the CRLF after its data
        self._in_trailer = False  # after the last chunk

    def feed(self, buffer: bytearray) -> bytes | Unread | None:
        """Take the body's bytes from the head of ``buffer``: the body once complete, None until then."""
        while True:
            if self._in_chunk:
                data = buffer[: self._chunk_left]
                del buffer[: len(data)]
                self._data += data
                self._chunk_left -= len(data)
                if self._chunk_left or len(buffer) < 2:
                    return None
                if buffer[:2] != b"\r\n":
                    return Unread.MALFORMED
                del buffer[:2]
                self._in_chunk = False
            line_end = buffer.find(b"\r\n", 0, _MAX_CHUNK_LINE)
            if line_end < 0:
                return Unread.MALFORMED if len(buffer) >= _MAX_CHUNK_LINE else None
            line = bytes(buffer[:line_end])
            del buffer[: line_end + 2]
            if self._in_trailer:
                if not line:
                    return bytes(self._data)
                continue
            size_match = _CHUNK_SIZE.fullmatch(line.rstrip(b" \t"))
            if size_match is None:
                return Unread.MALFORMED
            size = int(size_match[1], 16)
            if size == 0:
                self._in_trailer = True
            elif len(self._data) + size > self._limit:
                return Unread.TOO_BIG
            else:
                self._chunk_left = size
                self._in_chunk = True


class HTTPConnection(asyncio.Protocol):
    """One HTTP client of the broker; its requests are answered in order."""

    def __init__(self, handler: Handler, connections: set[HTTPConnection]) -> None:
        self._handler = handler
        self._connections = connections
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._head_searched = 0  # bytes at the start of the buffer known to hold no end of head
        self._head: _Head | None = None  # of the request whose body is awaited
        self._body: _SizedBody | _ChunkedBody | None = None
        self._continue_sent = False
        self._closing = False
        self._writing_paused = False  # the client does not read its replies
        self._close_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its API.
        self._transport = cast(asyncio.Transport, transport)
        self._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        self._transport = None
        if self._close_timer is not None:
            self._close_timer.cancel()

    def abort(self) -> None:
        """Close at once, dropping what the client has not read yet."""
        if self._transport is not None:
            self._transport.abort()

    def pause_writing(self) -> None:
        # As Go's server, blocked writing a reply, read no more requests meanwhile.
        self._writing_paused = True
        if self._transport is not None and not self._closing:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._transport is not None and not self._closing:
            self._transport.resume_reading()
            self._answer_requests()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return  # the client is still sending what will never be read
        self._buffer += data
        self._answer_requests()

    def _answer_requests(self) -> None:
        """Answer the requests complete in the buffer, in order, while the client reads the replies."""
        while not self._closing and not self._writing_paused:
            if self._head is None:
                try:
                    head = self._read_head()
                except _BadRequest as error:
                    assert self._transport is not None
                    self._transport.write(error.reply())
                    self._close_after_reply(self._transport)
                    return
                if head is None:
                    return
                self._head = head
                limit = self._handler.body_limit(head.path)
                self._body = (
                    _ChunkedBody(limit) if head.content_length is None else _SizedBody(head.content_length, limit)
                )
            assert self._body is not None
            body = self._body.feed(self._buffer)
            if body is None:
                self._expect_continue(self._head)
                return
            self._answer(self._head, body)

    def _read_head(self) -> _Head | None:
        """The next request's head, taken from the buffer; None while incomplete."""
        buffer = self._buffer
        if buffer.startswith((b"\r", b"\n")):
            # Go skips empty lines before a request line.
            del buffer[: len(buffer) - len(buffer.lstrip(b"\r\n"))]
            self._head_searched = 0
        end = _HEAD_END.search(buffer, max(0, self._head_searched - 2))
        if end is None:
            line_end = buffer.find(b"\n")
            if line_end >= 0:
                # Refuse a bad request line at once rather than wait for headers that may never come.
                _parse_request_line(buffer[:line_end].decode("latin-1").removesuffix("\r"))
            if len(buffer) > _MAX_HEAD:
                raise _BadRequest(431)
            self._head_searched = len(buffer)
            return None
        if end.start() > _MAX_HEAD:
            raise _BadRequest(431)
        head = _parse_head(buffer[: end.start()].decode("latin-1"))
        del buffer[: end.end()]
        self._head_searched = 0
        return head

    def _expect_continue(self, head: _Head) -> None:
        if head.expects_continue and not self._continue_sent:
            self._continue_sent = True
            assert self._transport is not None
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _answer(self, head: _Head, body: bytes | Unread) -> None:
        self._head = self._body = None
        request = Request(head.method, head.path, head.raw_query, head.content_length, body)
        response = self._handler.handle(request)
        if request.body_read and head.content_length != 0:
            # Go sends it when the handler reads the body, even one already here.
            self._expect_continue(head)
        self._continue_sent = False
        # What is left of an unread body would be taken for the next request.
        close = not head.keep_alive or isinstance(body, Unread)
        self._respond(response, close=close, http10=head.http10, head_only=head.method == "HEAD")

    def _respond(self, response: Response, *, close: bool, http10: bool = False, head_only: bool = False) -> None:
        transport = self._transport
        assert transport is not None
        # Go writes the handler's headers by name, then those it adds itself: a
        # plain-text type is the one it sniffs from a body nsqd gives no type.
        sniffed = response.content_type == TEXT
        lines = [f"HTTP/1.{0 if http10 else 1} {response.status} {_REASONS.get(response.status, '')}"]
        if response.allow is not None:
            lines.append(f"Allow: {response.allow}")
        if response.content_type is not None and not sniffed:
            lines.append(f"Content-Type: {response.content_type}")
        if response.nsq_header:
            lines.append("X-Nsq-Content-Type: nsq; version=1.0")
        lines.append(f"Date: {_http_date()}")
        lines.append(f"Content-Length: {len(response.body)}")
        if sniffed:
            lines.append(f"Content-Type: {TEXT}")
        if http10:
            if not close:
                lines.append("Connection: keep-alive")
        elif close:
            lines.append("Connection: close")
        transport.write(("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head_only else response.body))
        if close:
            self._close_after_reply(transport)

    def _close_after_reply(self, transport: asyncio.Transport) -> None:
        self._closing = True
        self._buffer.clear()
        if transport.can_write_eof():
            transport.write_eof()
        self._close_timer = asyncio.get_running_loop().call_later(_LINGER, transport.close)


def _parse_request_line(line: str) -> tuple[str, str, str, str]:
    """Method, path, raw query and version, as Go's server reads a request line."""
    method, _, rest = line.partition(" ")
    target, _, version = rest.partition(" ")
    raw_path, _, raw_query = target.partition("?")
    if (
        _VERSION.fullmatch(version) is None
        or not _TOKEN.fullmatch(method)
        or not (raw_path.startswith("/") or target == "*")
        or _CONTROL.search(target)
        or _BAD_ESCAPE.search(raw_path)
    ):
        raise _BadRequest(400)
    return method, unquote(raw_path, errors="surrogateescape"), raw_query, version


def _parse_head(head: str) -> _Head:
    """The request's head, refused in the order Go's server checks it."""
    request_line, *field_lines = head.split("\n")
    method, path, raw_query, version = _parse_request_line(request_line.removesuffix("\r"))
    http10 = version == "HTTP/1.0"
    fields: dict[str, list[str]] = {}
    names: list[str] = []
    for line in field_lines:
        name, colon, value = line.removesuffix("\r").partition(":")
        if not colon:
            raise _BadRequest(400)
        if not name:
            continue  # Go skips a field without a name
        names.append(name)
        fields.setdefault(name.lower(), []).append(value.strip(" \t"))
    hosts = fields.get("host", [])
    if len(hosts) > 1:
        raise _BadRequest(400)
    # Go ignores Transfer-Encoding in HTTP/1.0, knows only chunked, and then ignores Content-Length.
    transfer_encodings = [] if http10 else [value.lower() for value in fields.get("transfer-encoding", [])]
    if transfer_encodings not in ([], ["chunked"]):
        raise _BadRequest(501)
    content_length = None if transfer_encodings else _content_length(fields.get("content-length", []))
    if version[5] != "1":
        raise _BadRequest(505, "unsupported protocol version")
    if not hosts and not http10:
        raise _BadRequest(400, "missing required Host header")
    if hosts and _BAD_HOST.search(hosts[0]):
        raise _BadRequest(400, "malformed Host header")
    if not all(_TOKEN.fullmatch(name) for name in names):
        raise _BadRequest(400, "invalid header name")
    if any(_CONTROL_BUT_TAB.search(value) for values in fields.values() for value in values):
        raise _BadRequest(400, "invalid header value")
    connection = fields.get("connection", [""])[0]
    keep_alive = _has_token(connection, "keep-alive") if http10 else not _has_token(connection, "close")
    expect = fields.get("expect", [""])[0]
    expects_continue = _has_token(expect, "100-continue")
    if expect and not expects_continue:
        raise _BadRequest(417)
    return _Head(method, path, raw_query, http10, content_length, keep_alive, expects_continue and not http10)


def _content_length(values: list[str]) -> int:
    """The declared body size: 0 when none is (Go's rule for requests)."""
    if not values:
        return 0
    text = values[0]
    if any(value != text for value in values) or not re.fullmatch(r"[0-9]{1,19}", text) or int(text) >= 2**63:
        raise _BadRequest(400)
    return int(text)


def _has_token(value: str, token: str) -> bool:
    return token in (part.strip(" \t").lower() for part in value.split(","))


def _parse_query(raw: str) -> dict[str, str]:
    """The first value of each parameter; ValueError where Go's ``url.ParseQuery`` fails."""
    query: dict[str, str] = {}
    if _BAD_ESCAPE.search(raw) or ";" in raw:
        raise ValueError("invalid query")
    for pair in raw.split("&"):
        if not pair:
            continue
        key, _, value = pair.partition("=")
        name = unquote_plus(key, errors="surrogateescape")
        query.setdefault(name, unquote_plus(value, errors="surrogateescape"))
    return query
