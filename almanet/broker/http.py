"""nsqd's HTTP API (its ``http.go``), plus nsqlookupd's ``/lookup`` and ``/nodes``.

Responses are rendered as nsqd v1.2+ renders them (``http_api.V1``): errors
as ``{"message":"CODE"}`` with their status, ``OK`` and text as plain
bodies, JSON compact, an empty body for the admin routes, and the
``X-NSQ-Content-Type`` header on all but ``/ping``. Handlers check their
arguments in nsqd's order, and read the query string and the body only
where nsqd does. The HTTP server they answer through is ``httpserver``.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, Protocol

from almanet._speedups.frames import is_valid_name, split_mpub
from almanet.broker.httpserver import JSON, TEXT, HTTPError, Request, Response
from almanet.broker.options import BrokerOptions
from almanet.broker.stats import StatsSource, stats, stats_text
from almanet.broker.topics import QueueFull, Topic
from almanet.wire.errors import CommandError

__all__ = ["API", "HTTPError", "Nsqd"]

logger = logging.getLogger("almanet.broker")

_INT32 = struct.Struct(">i")
_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}
# nsqd's answer, as its http.go writes it.
_TLS_REQUIRED = b'{"message": "TLS_REQUIRED", "https_port": 0}'


class Nsqd(StatsSource, Protocol):
    """The broker, as its HTTP API sees it."""

    @property
    def options(self) -> BrokerOptions: ...
    @property
    def broadcast_address(self) -> str: ...
    @property
    def tcp_address(self) -> str: ...
    @property
    def tcp_port(self) -> int: ...
    @property
    def http_port(self) -> int: ...
    @property
    def max_req_timeout_ms(self) -> int: ...

    def get_topic(self, name: str) -> Topic: ...


class API:
    """nsqd's HTTP routes over a broker."""

    def __init__(self, broker: Nsqd) -> None:
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
            "/nodes": ("GET", self._nodes),
        }

    def body_limit(self, path: str) -> int:
        """The most a route reads of a body: /pub refuses a larger one unread, as nsqd does."""
        options = self._broker.options
        return options.max_msg_size if path == "/pub" else options.max_body_size

    def handle(self, request: Request) -> Response:
        if self._broker.options.tls_required_mode is True and request.path not in _LOOKUPD_ROUTES:
            # nsqd's plain HTTP server refuses everything when TLS is required of all
            # (--tls-required=tcp-https exempts HTTP); there is no HTTPS listener here.
            # /lookup and /nodes are nsqlookupd's, which nsqd's setting does not reach.
            return Response(403, _TLS_REQUIRED, JSON)
        route = self._routes.get(request.path)
        if route is None:
            return _error_response(HTTPError(404, "NOT_FOUND"))
        method, handler = route
        if request.method != method:
            # httprouter names the route's methods in Allow, and answers OPTIONS itself.
            allow = ", ".join(sorted([method, "OPTIONS"]))
            if request.method == "OPTIONS":
                return Response(200, b"", None, nsq_header=False, allow=allow)
            return Response(405, _error_body("METHOD_NOT_ALLOWED"), JSON, allow=allow)
        try:
            return handler(request)
        except HTTPError as error:
            return _error_response(error)
        except Exception:
            # As nsqd's router answers a handler's panic.
            logger.exception("HTTP %s %s failed", request.method, request.path)
            return _error_response(HTTPError(500, "INTERNAL_ERROR"))

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
        return Response(200, b"OK", TEXT, nsq_header=False)

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
        # An empty name filters nothing, as in nsqd.
        topic_name = query.get("topic") or None
        report = stats(self._broker, topic_name, query.get("channel") or None, include_clients)
        if query.get("format") == "json":
            return _json(report)
        return Response(200, stats_text(self._broker, report).encode(), TEXT)

    def _publish(self, topic: Topic, bodies: list[bytes], delay: float = 0.0) -> Response:
        try:
            topic.publish(bodies, time.time_ns(), delay)
        except QueueFull:
            raise HTTPError(503, "MEM_QUEUE_FULL") from None
        return Response(200, b"OK", TEXT)

    def _pub(self, request: Request) -> Response:
        # nsqd reads the body before it looks at the query.
        body = request.read_body()
        if body is None:
            raise HTTPError(413, "MSG_TOO_BIG")
        if not body:
            raise HTTPError(400, "MSG_EMPTY")
        topic = self._broker.get_topic(_topic_name(request))
        delay = 0.0
        if "defer" in request.query:
            defer_text = request.query["defer"]
            if not re.fullmatch(r"[+-]?[0-9]+", defer_text):
                raise HTTPError(400, "INVALID_DEFER")
            defer_ms = int(defer_text)
            if not 0 <= defer_ms <= self._broker.max_req_timeout_ms:
                raise HTTPError(400, "INVALID_DEFER")
            delay = defer_ms / 1000
        return self._publish(topic, [body], delay)

    def _mpub(self, request: Request) -> Response:
        options = self._broker.options
        if request.content_length is not None and request.content_length > options.max_body_size:
            raise HTTPError(413, "BODY_TOO_BIG")
        topic = self._broker.get_topic(_topic_name(request))
        binary = request.query.get("binary")
        body = request.read_body()
        if body is None:
            raise HTTPError(413, "BODY_TOO_BIG")
        if binary is not None and _BOOLEANS.get(binary, True):
            try:
                bodies = split_mpub(body, 0, _binary_mpub_end(body), options.max_msg_size, options.max_body_size)
            except CommandError as error:
                raise HTTPError(413, error.code[2:]) from None
        else:
            # One message per line; nsqd skips empty lines.
            bodies = [line for line in body.split(b"\n") if line]
            if any(len(line) > options.max_msg_size for line in bodies):
                raise HTTPError(413, "MSG_TOO_BIG")
        return self._publish(topic, bodies)

    def _topic_create(self, request: Request) -> Response:
        self._broker.get_topic(_topic_name(request))
        return _EMPTY

    def _topic_delete(self, request: Request) -> Response:
        self._topic(request).delete()
        return _EMPTY

    def _topic_empty(self, request: Request) -> Response:
        _topic_name(request)
        self._topic(request).empty()
        return _EMPTY

    def _channel_create(self, request: Request) -> Response:
        _, channel_name = _topic_and_channel_names(request)
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
        _, channel_name = _topic_and_channel_names(request)
        topic = self._topic(request)
        if channel_name not in topic.channels:
            raise HTTPError(404, "CHANNEL_NOT_FOUND")
        return topic, channel_name

    def _lookup(self, request: Request) -> Response:
        """nsqlookupd's answer, with this broker as the only producer."""
        topic = self._topic(request)
        return _json({"channels": sorted(topic.channels), "producers": [self._producer()]})

    def _nodes(self, request: Request) -> Response:
        """nsqlookupd's list of every nsqd, with its topics: this broker alone."""
        topics = sorted(self._broker.topics)
        node = {**self._producer(), "tombstones": [False] * len(topics), "topics": topics}
        return _json({"producers": [node]})

    def _producer(self) -> dict[str, Any]:
        """This broker as nsqlookupd describes an nsqd (a producer)."""
        broker = self._broker
        return {
            "remote_address": broker.tcp_address,
            "hostname": socket.gethostname(),
            "broadcast_address": broker.broadcast_address,
            "tcp_port": broker.tcp_port,
            "http_port": broker.http_port,
            "version": broker.version,
        }


_EMPTY = Response(200, b"", None)
_LOOKUPD_ROUTES = ("/lookup", "/nodes")


def _json(data: Any) -> Response:
    return Response(200, json.dumps(data, separators=(",", ":")).encode(), JSON)


def _error_body(message: str) -> bytes:
    return json.dumps({"message": message}, separators=(",", ":")).encode()


def _error_response(error: HTTPError) -> Response:
    return Response(error.status, _error_body(error.message), JSON)


def _binary_mpub_end(body: bytes) -> int:
    """Where the messages a binary ``/mpub`` body counts end: nsqd ignores what follows them."""
    if len(body) < 4:
        return len(body)
    end = 4
    for _ in range(_INT32.unpack_from(body)[0]):
        size = _INT32.unpack_from(body, end)[0] if end + 4 <= len(body) else 0
        if size <= 0 or end + 4 + size > len(body):
            return len(body)  # a faulty message, for split_mpub to report as nsqd does
        end += 4 + size
    return end


def _topic_name(request: Request) -> str:
    """The ``topic`` parameter, checked as nsqd's ``getTopicFromQuery`` checks it."""
    name = request.query.get("topic")
    if name is None:
        raise HTTPError(400, "MISSING_ARG_TOPIC")
    if not is_valid_name(name.encode("utf-8", "surrogateescape")):
        raise HTTPError(400, "INVALID_TOPIC")
    return name


def _topic_and_channel_names(request: Request) -> tuple[str, str]:
    """``topic`` and ``channel``, checked as nsqd's channel routes check them."""
    names = []
    for kind in ("topic", "channel"):
        name = request.query.get(kind)
        if name is None:
            raise HTTPError(400, f"MISSING_ARG_{kind.upper()}")
        if not is_valid_name(name.encode("utf-8", "surrogateescape")):
            raise HTTPError(400, f"INVALID_ARG_{kind.upper()}")
        names.append(name)
    return names[0], names[1]
