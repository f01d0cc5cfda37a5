"""The embedded broker's HTTP API: nsqd's routes, plus nsqlookupd's ``/lookup``.

Responses are rendered as nsqd v1.2+ renders them (``http_api.V1``): errors
as ``{"message":"CODE"}`` with their status, ``OK`` and text as plain
bodies, JSON compact, an empty body for the admin routes, and the
``X-NSQ-Content-Type`` header on all but ``/ping``. A minimal HTTP/1.1
server: keep-alive, ``Content-Length`` or chunked request bodies,
``Expect: 100-continue``.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

from almanet._speedups.frames import is_valid_name, split_mpub
from almanet.broker.stats import stats, stats_text
from almanet.broker.topics import QueueFull, Topic
from almanet.nsq.errors import CommandError

if TYPE_CHECKING:
    from almanet.broker.server import Broker

_MAX_HEAD = 64 * 1024
_TEXT = "text/plain; charset=utf-8"
_JSON = "application/json; charset=utf-8"
_REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Request Entity Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
}
_BAD_ESCAPE = re.compile(rb"%(?![0-9a-fA-F]{2})")
_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}


class HTTPError(Exception):
    """An nsqd API error: ``{"message": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Response:
    __slots__ = ("body", "content_type", "nsq_header", "status")

    def __init__(self, status: int, body: bytes, content_type: str | None, nsq_header: bool = True) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.nsq_header = nsq_header


class Request:
    __slots__ = ("body", "method", "path", "query")

    def __init__(self, method: str, path: str, query: dict[str, str], body: bytes) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.body = body

    def topic_name(self) -> str:
        """The ``topic`` parameter, checked as nsqd's ``getTopicFromQuery`` checks it."""
        name = self.query.get("topic")
        if name is None:
            raise HTTPError(400, "MISSING_ARG_TOPIC")
        if not is_valid_name(name.encode("utf-8", "surrogateescape")):
            raise HTTPError(400, "INVALID_TOPIC")
        return name

    def topic_and_channel_names(self) -> tuple[str, str]:
        """``topic`` and ``channel``, checked as nsqd's channel routes check them."""
        names = []
        for kind in ("topic", "channel"):
            name = self.query.get(kind)
            if name is None:
                raise HTTPError(400, f"MISSING_ARG_{kind.upper()}")
            if not is_valid_name(name.encode("utf-8", "surrogateescape")):
                raise HTTPError(400, f"INVALID_ARG_{kind.upper()}")
            names.append(name)
        return names[0], names[1]


class HTTPConnection(asyncio.Protocol):
    """One HTTP client of the broker."""

    def __init__(self, broker: Broker, connections: set[HTTPConnection]) -> None:
        self._api = API(broker)
        self._connections = connections
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._continue_sent = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        self._transport = None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while self._transport is not None and not self._transport.is_closing():
            if not self._handle_one():
                break

    def _handle_one(self) -> bool:
        """Answer the request at the head of the buffer if complete; False to wait for more bytes."""
        buffer = self._buffer
        head_end = buffer.find(b"\r\n\r\n")
        if head_end < 0:
            if len(buffer) > _MAX_HEAD:
                self._respond(Response(431, b"", None, nsq_header=False), keep_alive=False)
            return False
        try:
            method, target, version, headers = _parse_head(bytes(buffer[:head_end]))
        except ValueError:
            self._respond(Response(400, b"", None, nsq_header=False), keep_alive=False)
            return False
        keep_alive = _keeps_alive(version, headers)
        path, _, raw_query = target.partition("?")
        limit, too_big = self._api.body_limit(path)
        body_start = head_end + 4
        if "chunked" in headers.get("transfer-encoding", "").lower():
            decoded = _decode_chunked(buffer, body_start, limit)
            if decoded is None:
                self._expect_continue(headers)
                return False
            if isinstance(decoded, HTTPError):
                self._respond(_error_response(decoded), keep_alive=False)
                return False
            body, request_end = decoded
        else:
            length_text = headers.get("content-length", "0")
            if not length_text.isdigit():
                self._respond(Response(400, b"", None, nsq_header=False), keep_alive=False)
                return False
            length = int(length_text)
            if length > limit:
                self._respond(_error_response(HTTPError(413, too_big)), keep_alive=False)
                return False
            request_end = body_start + length
            if len(buffer) < request_end:
                self._expect_continue(headers)
                return False
            body = bytes(buffer[body_start:request_end])
        del buffer[:request_end]
        self._continue_sent = False
        try:
            query = _parse_query(raw_query.encode("latin-1"))
        except ValueError:
            response = _error_response(HTTPError(400, "INVALID_REQUEST"))
        else:
            response = self._api.handle(Request(method, path, query, body))
        self._respond(response, keep_alive)
        return True

    def _expect_continue(self, headers: dict[str, str]) -> None:
        if not self._continue_sent and headers.get("expect", "").lower() == "100-continue":
            self._continue_sent = True
            assert self._transport is not None
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _respond(self, response: Response, keep_alive: bool) -> None:
        assert self._transport is not None
        lines = [f"HTTP/1.1 {response.status} {_REASONS.get(response.status, '')}"]
        if response.content_type is not None:
            lines.append(f"Content-Type: {response.content_type}")
        if response.nsq_header:
            lines.append("X-Nsq-Content-Type: nsq; version=1.0")
        lines.append(f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S GMT', time.gmtime())}")
        lines.append(f"Content-Length: {len(response.body)}")
        if not keep_alive:
            lines.append("Connection: close")
        self._transport.write(("\r\n".join(lines) + "\r\n\r\n").encode() + response.body)
        if not keep_alive:
            self._transport.close()


class API:
    """nsqd's HTTP routes over a broker."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._routes: dict[str, tuple[str, Callable[[Request], Response]]] = {
            "/ping": ("GET", self._ping),
            "/info": ("GET", self._info),
            "/stats": ("GET", self._stats),
            "/pub": ("POST", self._pub),
            "/mpub": ("POST", self._mpub),
            "/topic/create": ("POST", self._topic_create),
            "/topic/delete": ("POST", self._topic_delete),
            "/topic/empty": ("POST", self._topic_empty),
            "/channel/create": ("POST", self._channel_create),
            "/channel/delete": ("POST", self._channel_delete),
            "/channel/empty": ("POST", self._channel_empty),
            "/lookup": ("GET", self._lookup),
        }

    def body_limit(self, path: str) -> tuple[int, str]:
        """The largest body a route reads, and the error for a larger one."""
        options = self._broker.options
        if path == "/pub":
            return options.max_msg_size, "MSG_TOO_BIG"
        return options.max_body_size, "BODY_TOO_BIG"

    def handle(self, request: Request) -> Response:
        route = self._routes.get(request.path)
        try:
            if route is None:
                raise HTTPError(404, "NOT_FOUND")
            method, handler = route
            if request.method != method:
                raise HTTPError(405, "METHOD_NOT_ALLOWED")
            return handler(request)
        except HTTPError as error:
            if request.path == "/ping":
                return Response(error.status, error.message.encode(), _TEXT, nsq_header=False)
            return _error_response(error)

    def _topic(self, request: Request) -> Topic:
        """The existing topic named by the query: 404 TOPIC_NOT_FOUND otherwise."""
        name = request.query.get("topic")
        if name is None:
            raise HTTPError(400, "MISSING_ARG_TOPIC")
        topic = self._broker.topics.get(name)
        if topic is None:
            raise HTTPError(404, "TOPIC_NOT_FOUND")
        return topic

    def _ping(self, request: Request) -> Response:
        return Response(200, b"OK", _TEXT, nsq_header=False)

    def _info(self, request: Request) -> Response:
        broker = self._broker
        options = broker.options
        return _json(
            {
                "version": broker.version,
                "broadcast_address": broker.broadcast_address,
                "hostname": socket.gethostname(),
                "http_port": broker.http_port,
                "tcp_port": broker.tcp_port,
                "start_time": broker.start_time,
                # Go durations marshal as integer nanoseconds.
                "max_heartbeat_interval": round(options.max_heartbeat_interval * 1e9),
                "max_output_buffer_size": options.max_output_buffer_size,
                "max_output_buffer_timeout": round(options.max_output_buffer_timeout * 1e9),
                "max_deflate_level": options.max_deflate_level,
            }
        )

    def _stats(self, request: Request) -> Response:
        query = request.query
        include_clients = _BOOLEANS.get(query.get("include_clients", ""), True)
        report = stats(self._broker, query.get("topic"), query.get("channel"), include_clients)
        if query.get("format") == "json":
            return _json(report)
        return Response(200, stats_text(self._broker, report).encode(), _TEXT)

    def _publish(self, topic: Topic, bodies: list[bytes], delay: float = 0.0) -> Response:
        try:
            topic.publish(bodies, time.time_ns(), delay)
        except QueueFull:
            raise HTTPError(503, "MEM_QUEUE_FULL") from None
        return Response(200, b"OK", _TEXT)

    def _pub(self, request: Request) -> Response:
        if not request.body:
            raise HTTPError(400, "MSG_EMPTY")
        topic = self._broker.get_topic(request.topic_name())
        delay = 0.0
        if "defer" in request.query:
            defer_text = request.query["defer"]
            if not re.fullmatch(r"[+-]?[0-9]+", defer_text):
                raise HTTPError(400, "INVALID_DEFER")
            defer_ms = int(defer_text)
            if not 0 <= defer_ms <= self._broker.max_req_timeout_ms:
                raise HTTPError(400, "INVALID_DEFER")
            delay = defer_ms / 1000
        return self._publish(topic, [request.body], delay)

    def _mpub(self, request: Request) -> Response:
        topic = self._broker.get_topic(request.topic_name())
        options = self._broker.options
        binary = request.query.get("binary")
        if binary is not None and _BOOLEANS.get(binary, True):
            try:
                bodies = split_mpub(request.body, 0, len(request.body), options.max_msg_size, options.max_body_size)
            except CommandError as error:
                raise HTTPError(413, error.code[2:]) from None
        else:
            # One message per line; nsqd skips empty lines.
            bodies = [line for line in request.body.split(b"\n") if line]
            if any(len(body) > options.max_msg_size for body in bodies):
                raise HTTPError(413, "MSG_TOO_BIG")
        return self._publish(topic, bodies)

    def _topic_create(self, request: Request) -> Response:
        self._broker.get_topic(request.topic_name())
        return _EMPTY

    def _topic_delete(self, request: Request) -> Response:
        self._topic(request).delete()
        return _EMPTY

    def _topic_empty(self, request: Request) -> Response:
        request.topic_name()
        self._topic(request).empty()
        return _EMPTY

    def _channel_create(self, request: Request) -> Response:
        _topic_name, channel_name = request.topic_and_channel_names()
        self._topic(request).get_channel(channel_name)
        return _EMPTY

    def _channel_delete(self, request: Request) -> Response:
        topic, channel_name = self._existing_channel(request)
        topic.delete_channel(channel_name)
        return _EMPTY

    def _channel_empty(self, request: Request) -> Response:
        topic, channel_name = self._existing_channel(request)
        topic.channels[channel_name].empty()
        return _EMPTY

    def _existing_channel(self, request: Request) -> tuple[Topic, str]:
        _, channel_name = request.topic_and_channel_names()
        topic = self._topic(request)
        if channel_name not in topic.channels:
            raise HTTPError(404, "CHANNEL_NOT_FOUND")
        return topic, channel_name

    def _lookup(self, request: Request) -> Response:
        """nsqlookupd's answer, with this broker as the only producer."""
        topic = self._topic(request)
        broker = self._broker
        producer = {
            "remote_address": broker.tcp_address,
            "hostname": socket.gethostname(),
            "broadcast_address": broker.broadcast_address,
            "tcp_port": broker.tcp_port,
            "http_port": broker.http_port,
            "version": broker.version,
        }
        return _json({"channels": sorted(topic.channels), "producers": [producer]})


_EMPTY = Response(200, b"", None)


def _json(data: Any) -> Response:
    return Response(200, json.dumps(data, separators=(",", ":")).encode(), _JSON)


def _error_response(error: HTTPError) -> Response:
    return Response(error.status, json.dumps({"message": error.message}, separators=(",", ":")).encode(), _JSON)


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    method, target, version = request_line.split(" ")
    if not version.startswith("HTTP/1.") or not target.startswith("/"):
        raise ValueError(request_line)
    headers = {}
    for line in header_lines:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise ValueError(line)
        headers[name.lower()] = value.strip()
    return method, target, version, headers


def _keeps_alive(version: str, headers: dict[str, str]) -> bool:
    connection = headers.get("connection", "").lower()
    if version == "HTTP/1.0":
        return connection == "keep-alive"
    return connection != "close"


def _decode_chunked(buffer: bytearray, start: int, limit: int) -> tuple[bytes, int] | HTTPError | None:
    """A chunked body and where the request ends; None while incomplete."""
    body = bytearray()
    position = start
    while True:
        line_end = buffer.find(b"\r\n", position)
        if line_end < 0:
            return None
        size_text = bytes(buffer[position:line_end]).split(b";")[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            return HTTPError(400, "INVALID_REQUEST")
        position = line_end + 2
        if size == 0:
            trailer_end = buffer.find(b"\r\n", position)
            while trailer_end > position:  # skip trailer fields
                position = trailer_end + 2
                trailer_end = buffer.find(b"\r\n", position)
            if trailer_end < 0:
                return None
            return bytes(body), trailer_end + 2
        if len(body) + size > limit:
            return HTTPError(413, "BODY_TOO_BIG")
        if len(buffer) < position + size + 2:
            return None
        body += buffer[position : position + size]
        position += size + 2


def _parse_query(raw: bytes) -> dict[str, str]:
    """The first value of each parameter; ValueError where Go's ``url.ParseQuery`` fails."""
    query: dict[str, str] = {}
    if not raw:
        return query
    if _BAD_ESCAPE.search(raw) or b";" in raw:
        raise ValueError("invalid query")
    for pair in raw.split(b"&"):
        if not pair:
            continue
        key, _, value = pair.partition(b"=")
        name = unquote_plus(key.decode("latin-1"), errors="surrogateescape")
        query.setdefault(name, unquote_plus(value.decode("latin-1"), errors="surrogateescape"))
    return query
