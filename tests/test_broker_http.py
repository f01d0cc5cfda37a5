"""nsqd's HTTP API as the broker serves it, over real sockets.

The tests run against the shared broker of the ``almanet_broker`` fixture:
the embedded one, or a real nsqd when ALMANET_TEST_NSQD and
ALMANET_TEST_NSQD_HTTP are set, so they assert only what nsqd v1.2+ does
(its texts and status codes, from its source), with nsqd's default limits.
Those taking the ``embedded`` fixture test what only the embedded broker
serves: nsqlookupd's ``/lookup``. Those on ``small_broker`` run an embedded
broker of their own with tiny limits.

HTTP itself is checked as Go's net/http, nsqd's server, handles it:
keep-alive, pipelining, chunked bodies, ``Expect: 100-continue``, and a
plain 400 (or 417, 431, 501, 505) then a closed connection for what it
cannot parse.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import logging
import re
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO
from urllib.parse import urlencode

import pytest
from rawnsq import RawConnection

from almanet._speedups.frames import ResponseFrame, encode_pub
from almanet.pytest_plugin import BrokerAddresses, broker_in_thread
from almanet.wire.addresses import split_address
from almanet.wire.protocol import DEFAULT_MAX_BODY_SIZE, DEFAULT_MAX_MSG_SIZE, DEFAULT_MAX_REQ_TIMEOUT_MS, OK

# Long enough for a loaded CI machine; waits that succeed return at once.
TIMEOUT = 5.0
JSON = "application/json; charset=utf-8"
TEXT = "text/plain; charset=utf-8"
NSQ_V1 = "nsq; version=1.0"

TOPIC_FIELDS = [
    "topic_name",
    "channels",
    "depth",
    "backend_depth",
    "message_count",
    "message_bytes",
    "paused",
    "e2e_processing_latency",
]
CHANNEL_FIELDS = [
    "channel_name",
    "depth",
    "backend_depth",
    "in_flight_count",
    "deferred_count",
    "message_count",
    "requeue_count",
    "timeout_count",
    "client_count",
    "clients",
    "paused",
    "e2e_processing_latency",
]
CLIENT_FIELDS = [
    "client_id",
    "hostname",
    "version",
    "remote_address",
    "state",
    "ready_count",
    "in_flight_count",
    "message_count",
    "finish_count",
    "requeue_count",
    "connect_ts",
    "sample_rate",
    "deflate",
    "snappy",
    "user_agent",
    "tls",
    "tls_cipher_suite",
    "tls_version",
    "tls_negotiated_protocol",
    "tls_negotiated_protocol_is_mutual",
]
NO_LATENCY = {"count": 0, "percentiles": None}


# --- a plain HTTP client ----------------------------------------------------------


@dataclasses.dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    address: str,
    method: str,
    target: str,
    body: bytes | Iterable[bytes] | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """One request on a connection of its own; an iterable body goes chunked."""
    connection = http.client.HTTPConnection(*split_address(address), timeout=TIMEOUT)
    try:
        connection.request(method, target, body, headers or {})
        response = connection.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        connection.close()


def get(address: str, target: str) -> Reply:
    return call(address, "GET", target)


def post(address: str, target: str, body: bytes | Iterable[bytes] = b"") -> Reply:
    return call(address, "POST", target, body)


def error_body(message: str) -> bytes:
    return json.dumps({"message": message}, separators=(",", ":")).encode()


def assert_error(reply: Reply, status: int, message: str) -> None:
    """nsqd's error rendering: ``{"message":"CODE"}`` as JSON, with the X-NSQ header."""
    assert (reply.status, reply.body) == (status, error_body(message))
    assert reply.headers["Content-Type"] == JSON
    assert reply.headers["X-Nsq-Content-Type"] == NSQ_V1


def assert_ok(reply: Reply) -> None:
    assert (reply.status, reply.body) == (200, b"OK")
    assert reply.headers["Content-Type"] == TEXT
    assert reply.headers["X-Nsq-Content-Type"] == NSQ_V1


def assert_empty(reply: Reply) -> None:
    """The success of nsqd's admin routes: no body, so Go sets no Content-Type."""
    assert (reply.status, reply.body) == (200, b"")
    assert reply.headers["Content-Length"] == "0"
    assert "Content-Type" not in reply.headers
    assert reply.headers["X-Nsq-Content-Type"] == NSQ_V1


def stats(address: str, **params: str) -> Any:
    """``/stats?format=json`` (without nsqd's Go memory figures)."""
    reply = get(address, "/stats?" + urlencode({"format": "json", "include_mem": "false", **params}))
    assert reply.status == 200
    assert reply.headers["Content-Type"] == JSON
    return reply.json()


def topic_stats(address: str, topic: str) -> Any:
    """The topic's entry of ``/stats``, None while it does not exist."""
    topics = stats(address, topic=topic)["topics"]
    return topics[0] if topics else None


def channel_stats(address: str, topic: str, channel: str) -> Any:
    for entry in (topic_stats(address, topic) or {}).get("channels", []):
        if entry["channel_name"] == channel:
            return entry
    return None


def eventually(condition: Callable[[], object]) -> None:
    """Wait until ``condition()`` is true: nsqd moves messages from topic to channel in a goroutine."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


# --- raw sockets, for what http.client will not send ------------------------------


def connect(address: str) -> socket.socket:
    return socket.create_connection(split_address(address), timeout=TIMEOUT)


def read_until_closed(sock: socket.socket) -> bytes:
    """All the broker sends until it closes the connection (a hang fails on the timeout)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def exchange(address: str, data: bytes) -> bytes:
    """What the broker answers ``data`` on a fresh connection, up to its closing it."""
    with connect(address) as sock:
        sock.sendall(data)
        return read_until_closed(sock)


def read_response(stream: BinaryIO) -> Reply:
    """The next response on a socket's file; http.client cannot read pipelined ones."""
    status_line = stream.readline()
    headers = http.client.parse_headers(stream)
    return Reply(int(status_line.split()[1]), headers, stream.read(int(headers["Content-Length"])))


def binary_mpub(*bodies: bytes, count: int | None = None) -> bytes:
    """A ``/mpub?binary=true`` body: the count, then each message with its size."""
    header = struct.pack(">i", len(bodies) if count is None else count)
    return header + b"".join(struct.pack(">i", len(body)) + body for body in bodies)


@pytest.fixture
def address(almanet_broker: BrokerAddresses) -> str:
    """The shared broker's HTTP address."""
    return almanet_broker.http_address


@pytest.fixture(scope="module")
def small_broker() -> Iterator[str]:
    """The HTTP address of an embedded broker of the module's own, with tiny limits."""
    with broker_in_thread(
        tcp_address="127.0.0.1:0",
        http_address="127.0.0.1:0",
        max_msg_size=10,
        max_body_size=40,
        mem_queue_size=5,
        max_req_timeout=1.0,
    ) as broker:
        yield broker.http_address


@pytest.fixture
def no_broker_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail if the broker (or asyncio, for a protocol callback that raised) logs an error meanwhile."""
    yield
    assert [record for record in caplog.records if record.levelno >= logging.ERROR] == []


# --- /ping, /info, routing --------------------------------------------------------


def test_ping(address: str) -> None:
    reply = get(address, "/ping")
    assert (reply.status, reply.body) == (200, b"OK")
    assert reply.headers["Content-Type"] == TEXT
    assert "X-Nsq-Content-Type" not in reply.headers


def test_ping_ignores_the_query(address: str) -> None:
    # nsqd's ping handler never parses it.
    assert get(address, "/ping?%zz").body == b"OK"


def test_info(address: str, almanet_broker: BrokerAddresses) -> None:
    reply = get(address, "/info")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == JSON
    assert reply.headers["X-Nsq-Content-Type"] == NSQ_V1
    info = reply.json()
    assert list(info) == [
        "version",
        "broadcast_address",
        "hostname",
        "http_port",
        "tcp_port",
        "start_time",
        "max_heartbeat_interval",
        "max_output_buffer_size",
        "max_output_buffer_timeout",
        "max_deflate_level",
    ]
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", info["version"])
    assert info["http_port"] == split_address(almanet_broker.http_address)[1]
    assert info["tcp_port"] == split_address(almanet_broker.tcp_address)[1]
    assert 0 < info["start_time"] <= time.time()
    # Go durations: integer nanoseconds.
    assert info["max_heartbeat_interval"] % 1_000_000 == 0
    assert all(isinstance(info[key], int) for key in list(info)[3:])


@pytest.mark.parametrize("target", ["/nope", "/", "/put?topic=x", "/create_topic?topic=x", "/nope?%zz", "/pubx"])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_unknown_path_is_not_found(address: str, method: str, target: str) -> None:
    # The deprecated pre-1.2 routes (/put, /create_topic, ...) are gone too.
    assert_error(call(address, method, target), 404, "NOT_FOUND")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("POST", "/ping", "GET"),
        ("POST", "/info", "GET"),
        ("POST", "/stats", "GET"),
        ("GET", "/pub", "POST"),
        ("PUT", "/pub", "POST"),
        ("GET", "/mpub", "POST"),
        ("GET", "/topic/create", "POST"),
        ("DELETE", "/topic/delete", "POST"),
        ("GET", "/topic/empty", "POST"),
        ("GET", "/channel/create", "POST"),
        ("GET", "/channel/delete", "POST"),
        ("GET", "/channel/empty", "POST"),
    ],
)
def test_wrong_method_is_not_allowed(address: str, method: str, path: str, allowed: str) -> None:
    reply = call(address, method, f"{path}?topic=x&channel=y", b"body")
    assert_error(reply, 405, "METHOD_NOT_ALLOWED")
    assert allowed in reply.headers["Allow"]


def test_head_request_gets_no_body(address: str) -> None:
    # Only GET is routed, so HEAD is not allowed; its reply must still keep the connection in step.
    connection = http.client.HTTPConnection(*split_address(address), timeout=TIMEOUT)
    try:
        connection.request("HEAD", "/ping")
        response = connection.getresponse()
        assert (response.status, response.read()) == (405, b"")
        connection.request("GET", "/ping")
        assert connection.getresponse().read() == b"OK"
    finally:
        connection.close()


# --- /pub -------------------------------------------------------------------------


async def test_pub_delivers_the_body(almanet_broker: BrokerAddresses, topic: str) -> None:
    consumer = await RawConnection.consumer(almanet_broker.tcp_address, topic, "ch")
    body = b"binary \x00\xff\n body\r\n"
    assert_ok(await asyncio.to_thread(post, almanet_broker.http_address, f"/pub?topic={topic}", body))
    message = await consumer.message()
    assert (message.body, message.attempts) == (body, 1)
    await consumer.close()


async def test_pub_defer_delays_delivery(almanet_broker: BrokerAddresses, topic: str) -> None:
    consumer = await RawConnection.consumer(almanet_broker.tcp_address, topic, "ch")
    started = time.monotonic()
    assert_ok(await asyncio.to_thread(post, almanet_broker.http_address, f"/pub?topic={topic}&defer=500", b"later"))
    await asyncio.to_thread(
        eventually, lambda: channel_stats(almanet_broker.http_address, topic, "ch")["deferred_count"] == 1
    )
    await consumer.nothing(0.2)
    assert (await consumer.message()).body == b"later"
    assert time.monotonic() - started >= 0.5
    await consumer.close()


@pytest.mark.parametrize("defer", ["0", "%2B0", "007", str(DEFAULT_MAX_REQ_TIMEOUT_MS)])
def test_pub_defer_in_range(address: str, topic: str, defer: str) -> None:
    assert_ok(post(address, f"/pub?topic={topic}&defer={defer}", b"x"))


@pytest.mark.parametrize(
    ("query", "body", "status", "message"),
    [
        ("", b"", 400, "MSG_EMPTY"),  # the body is checked before the query
        ("topic=%zz", b"", 400, "MSG_EMPTY"),
        ("", b"x", 400, "MISSING_ARG_TOPIC"),
        ("channel=x", b"x", 400, "MISSING_ARG_TOPIC"),
        ("topic=", b"x", 400, "INVALID_TOPIC"),
        ("topic=bad%21name", b"x", 400, "INVALID_TOPIC"),
        ("topic=" + "t" * 65, b"x", 400, "INVALID_TOPIC"),
        ("topic=%23ephemeral", b"x", 400, "INVALID_TOPIC"),
        ("topic=%zz", b"x", 400, "INVALID_REQUEST"),
        ("topic=a%", b"x", 400, "INVALID_REQUEST"),
        ("topic=a;b", b"x", 400, "INVALID_REQUEST"),
        ("defer=x", b"x", 400, "MISSING_ARG_TOPIC"),  # the topic is checked before defer
        ("topic={topic}&defer=", b"x", 400, "INVALID_DEFER"),
        ("topic={topic}&defer=abc", b"x", 400, "INVALID_DEFER"),
        ("topic={topic}&defer=1.5", b"x", 400, "INVALID_DEFER"),
        ("topic={topic}&defer=-1", b"x", 400, "INVALID_DEFER"),
        ("topic={topic}&defer=%201", b"x", 400, "INVALID_DEFER"),
        (f"topic={{topic}}&defer={DEFAULT_MAX_REQ_TIMEOUT_MS + 1}", b"x", 400, "INVALID_DEFER"),
        ("topic={topic}", b"", 400, "MSG_EMPTY"),
    ],
)
def test_pub_errors(address: str, topic: str, query: str, body: bytes, status: int, message: str) -> None:
    assert_error(post(address, "/pub?" + query.format(topic=topic), body), status, message)


def test_pub_with_invalid_defer_still_creates_the_topic(address: str, topic: str) -> None:
    assert_error(post(address, f"/pub?topic={topic}&defer=-5", b"x"), 400, "INVALID_DEFER")
    assert topic_stats(address, topic)["message_count"] == 0


def test_pub_message_size_limit(address: str, topic: str) -> None:
    assert_ok(post(address, f"/pub?topic={topic}", b"m" * DEFAULT_MAX_MSG_SIZE))
    assert topic_stats(address, topic)["message_bytes"] == DEFAULT_MAX_MSG_SIZE
    # Read to the limit, chunked: nsqd cannot tell the size beforehand.
    too_big = (b"m" * (DEFAULT_MAX_MSG_SIZE // 2), b"m" * (DEFAULT_MAX_MSG_SIZE // 2 + 1))
    assert_error(post(address, f"/pub?topic={topic}", iter(too_big)), 413, "MSG_TOO_BIG")


def test_pub_declared_too_big_is_refused_unread(address: str) -> None:
    # The declared length alone is refused, before anything else and without waiting for the body.
    with connect(address) as sock:
        sock.sendall(b"POST /pub HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (DEFAULT_MAX_MSG_SIZE + 1))
        reply = read_response(sock.makefile("rb"))
    assert_error(reply, 413, "MSG_TOO_BIG")
    assert reply.headers["Connection"] == "close"


# --- /mpub ------------------------------------------------------------------------


async def test_mpub_lines_are_messages(almanet_broker: BrokerAddresses, topic: str) -> None:
    consumer = await RawConnection.consumer(almanet_broker.tcp_address, topic, "ch", rdy=10)
    body = b"one\ntwo\n\n\nthree\r\nfour"  # empty lines are skipped; only "\n" ends a line
    assert_ok(await asyncio.to_thread(post, almanet_broker.http_address, f"/mpub?topic={topic}", body))
    assert [message.body for message in await consumer.messages(4)] == [b"one", b"two", b"three\r", b"four"]
    await consumer.nothing()
    await consumer.close()


@pytest.mark.parametrize("binary", ["true", "1", "yes"])  # an unknown value means binary too
async def test_mpub_binary(almanet_broker: BrokerAddresses, topic: str, binary: str) -> None:
    consumer = await RawConnection.consumer(almanet_broker.tcp_address, topic, "ch", rdy=10)
    bodies = [b"line\nbreaks\n", b"\x00", b"three"]
    # What follows the counted messages is ignored.
    body = binary_mpub(*bodies) + b"\x00\x00\x00\x05extra"
    target = f"/mpub?topic={topic}&binary={binary}"
    assert_ok(await asyncio.to_thread(post, almanet_broker.http_address, target, body))
    assert [message.body for message in await consumer.messages(3)] == bodies
    await consumer.nothing()
    await consumer.close()


@pytest.mark.parametrize("binary", ["false", "0"])
def test_mpub_binary_false_is_text(address: str, topic: str, binary: str) -> None:
    assert_ok(post(address, f"/mpub?topic={topic}&binary={binary}", binary_mpub(b"a\nb")))
    assert topic_stats(address, topic)["message_count"] == 2


@pytest.mark.parametrize("body", [b"", b"\n\n\n"])
def test_mpub_without_messages_is_ok(address: str, topic: str, body: bytes) -> None:
    # No MSG_EMPTY here: nsqd publishes the empty list, creating the topic.
    assert_ok(post(address, f"/mpub?topic={topic}", body))
    assert topic_stats(address, topic)["message_count"] == 0


@pytest.mark.parametrize(
    ("query", "body", "status", "message"),
    [
        ("", b"", 400, "MISSING_ARG_TOPIC"),
        ("topic=", b"a", 400, "INVALID_TOPIC"),
        ("topic=a%2Fb", b"a", 400, "INVALID_TOPIC"),
        ("topic=%zz", b"a", 400, "INVALID_REQUEST"),
        ("topic={topic}", b"a\n" + b"m" * (DEFAULT_MAX_MSG_SIZE + 1) + b"\nb", 413, "MSG_TOO_BIG"),
        ("topic={topic}&binary=true", b"", 413, "BAD_BODY"),
        ("topic={topic}&binary=true", b"\x00\x00\x01", 413, "BAD_BODY"),
        ("topic={topic}&binary=true", binary_mpub(count=0), 413, "BAD_BODY"),
        ("topic={topic}&binary=true", binary_mpub(count=-1), 413, "BAD_BODY"),
        ("topic={topic}&binary=true", binary_mpub(b"a", count=(DEFAULT_MAX_BODY_SIZE - 4) // 5 + 1), 413, "BAD_BODY"),
        ("topic={topic}&binary=true", binary_mpub(count=1), 413, "BAD_MESSAGE"),
        ("topic={topic}&binary=true", binary_mpub(b"a", count=2), 413, "BAD_MESSAGE"),
        ("topic={topic}&binary=true", binary_mpub(b"") + b"a", 413, "BAD_MESSAGE"),
        ("topic={topic}&binary=true", struct.pack(">ii", 1, -1), 413, "BAD_MESSAGE"),
        ("topic={topic}&binary=true", struct.pack(">ii", 1, DEFAULT_MAX_MSG_SIZE + 1), 413, "BAD_MESSAGE"),
        ("topic={topic}&binary=true", struct.pack(">ii", 1, 5) + b"abc", 413, "BAD_MESSAGE"),
    ],
)
def test_mpub_errors(address: str, topic: str, query: str, body: bytes, status: int, message: str) -> None:
    assert_error(post(address, "/mpub?" + query.format(topic=topic), body), status, message)


def test_mpub_body_size_limit(address: str, topic: str) -> None:
    # Declared too big: refused before the query is looked at.
    with connect(address) as sock:
        sock.sendall(b"POST /mpub HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (DEFAULT_MAX_BODY_SIZE + 1))
        assert_error(read_response(sock.makefile("rb")), 413, "BODY_TOO_BIG")
    # Chunked: read up to the limit.
    lines = b"m" * 1023 + b"\n"
    chunks = [lines * 1024] * 5 + [b"m"]
    assert_error(post(address, f"/mpub?topic={topic}", iter(chunks)), 413, "BODY_TOO_BIG")
    assert topic_stats(address, topic)["message_count"] == 0


# --- /stats -----------------------------------------------------------------------


def test_stats_json_fields(address: str, topic: str) -> None:
    assert_empty(post(address, f"/topic/create?topic={topic}"))
    assert_empty(post(address, f"/channel/create?topic={topic}&channel=ch"))
    for body in (b"one", b"three"):
        assert_ok(post(address, f"/pub?topic={topic}", body))
    eventually(lambda: channel_stats(address, topic, "ch")["depth"] == 2)
    report = stats(address, topic=topic)
    assert list(report) == ["version", "health", "start_time", "topics", "producers"]
    assert report["health"] == "OK"
    assert isinstance(report["start_time"], int)
    assert report["version"] == get(address, "/info").json()["version"]
    [topic_report] = report["topics"]
    assert list(topic_report) == TOPIC_FIELDS
    [channel_report] = topic_report.pop("channels")
    assert topic_report == {
        "topic_name": topic,
        "depth": 0,
        "backend_depth": 0,
        "message_count": 2,
        "message_bytes": 8,
        "paused": False,
        "e2e_processing_latency": NO_LATENCY,
    }
    assert list(channel_report) == CHANNEL_FIELDS
    assert channel_report == {
        "channel_name": "ch",
        "depth": 2,
        "backend_depth": 0,
        "in_flight_count": 0,
        "deferred_count": 0,
        "message_count": 2,
        "requeue_count": 0,
        "timeout_count": 0,
        "client_count": 0,
        "clients": [],
        "paused": False,
        "e2e_processing_latency": NO_LATENCY,
    }


def test_stats_filters(address: str, topic: str) -> None:
    other = f"{topic}.other"
    for name, channel in ((topic, "first"), (topic, "second"), (other, "second")):
        assert_empty(post(address, f"/topic/create?topic={name}"))
        assert_empty(post(address, f"/channel/create?topic={name}&channel={channel}"))

    def names(report: Any) -> dict[str, list[str]]:
        return {entry["topic_name"]: [c["channel_name"] for c in entry["channels"]] for entry in report["topics"]}

    assert names(stats(address, topic=topic)) == {topic: ["first", "second"]}  # channels sorted by name
    assert names(stats(address, topic=topic, channel="second")) == {topic: ["second"]}
    # A topic without the channel is left out; an unknown topic gives null, producers too.
    assert stats(address, topic=topic, channel="none")["topics"] == []
    unknown = stats(address, topic=f"{topic}.unknown")
    assert (unknown["topics"], unknown["producers"]) == (None, None)
    first = names(stats(address, channel="first"))
    assert first[topic] == ["first"] and other not in first
    # Empty filters filter nothing; topics are sorted by name.
    everything = stats(address, topic="", channel="")["topics"]
    listed = [entry["topic_name"] for entry in everything]
    assert listed == sorted(listed) and {topic, other} <= set(listed)
    # Clients are listed unless include_clients is false ("0" or "false"; any other value is true).
    for value, clients in (("false", None), ("0", None), ("true", []), ("1", []), ("yes", [])):
        report = stats(address, topic=topic, include_clients=value)
        assert [channel["clients"] for channel in report["topics"][0]["channels"]] == [clients, clients]
    assert stats(address, topic=topic, include_clients="false")["producers"] is None


def test_stats_bad_query(address: str) -> None:
    assert_error(get(address, "/stats?format=json&topic=%zz"), 400, "INVALID_REQUEST")


async def test_stats_consumer(almanet_broker: BrokerAddresses, topic: str) -> None:
    address = almanet_broker.http_address
    consumer = await RawConnection.consumer(
        almanet_broker.tcp_address, topic, "ch", client_id="stats-consumer", hostname="host", user_agent="ua/1"
    )
    report = await asyncio.to_thread(stats, address, topic=topic)
    [client] = report["topics"][0]["channels"][0]["clients"]
    assert list(client) == CLIENT_FIELDS
    port = client["remote_address"].rpartition(":")[2]
    assert client == {
        "client_id": "stats-consumer",
        "hostname": "host",
        "version": "V2",
        "remote_address": client["remote_address"],
        "state": 3,  # subscribed
        "ready_count": 1,
        "in_flight_count": 0,
        "message_count": 0,
        "finish_count": 0,
        "requeue_count": 0,
        "connect_ts": client["connect_ts"],
        "sample_rate": 0,
        "deflate": False,
        "snappy": False,
        "user_agent": "ua/1",
        "tls": False,
        "tls_cipher_suite": "",
        "tls_version": "",
        "tls_negotiated_protocol": "",
        "tls_negotiated_protocol_is_mutual": False,
    }
    assert abs(client["connect_ts"] - time.time()) < 60
    assert_ok(await asyncio.to_thread(post, address, f"/pub?topic={topic}", b"x"))
    await consumer.message()
    channel = await asyncio.to_thread(channel_stats, address, topic, "ch")
    assert (channel["in_flight_count"], channel["message_count"], channel["client_count"]) == (1, 1, 1)
    assert (channel["clients"][0]["in_flight_count"], channel["clients"][0]["message_count"]) == (1, 1)
    text = (await asyncio.to_thread(get, address, f"/stats?topic={topic}&include_mem=false")).body.decode()
    client_id = f"host:{port} ua/1"
    assert re.search(
        rf"\n        \[V2 {re.escape(f'{client_id:<21}')}\] state: 3 inflt: 1    rdy: 1    fin: 0        "
        r"re-q: 0        msgs: 1        connected: \d+s\n",
        text,
    ), text
    # Without clients, the count remains.
    report = await asyncio.to_thread(stats, address, topic=topic, include_clients="false")
    [channel] = report["topics"][0]["channels"]
    assert (channel["client_count"], channel["clients"]) == (1, None)
    await consumer.close()


async def test_stats_producer(almanet_broker: BrokerAddresses, topic: str) -> None:
    address = almanet_broker.http_address
    other = f"{topic}.other"
    producer = await RawConnection.open(almanet_broker.tcp_address)
    await producer.identify(client_id=f"producer-{topic}", hostname="host", user_agent="ua/1")
    for name in (topic, topic, other):
        producer.send(encode_pub(name, b"x"))
        assert await producer.frame() == ResponseFrame(OK)

    def ours(**params: str) -> Any:
        producers = stats(address, **params)["producers"] or []
        return next(entry for entry in producers if entry["client_id"] == f"producer-{topic}")

    mine = await asyncio.to_thread(ours, topic=topic)
    assert list(mine) == [*CLIENT_FIELDS[:15], "pub_counts", *CLIENT_FIELDS[15:]]
    assert (mine["state"], mine["message_count"]) == (0, 0)
    assert mine["pub_counts"] == [{"topic": topic, "count": 2}]
    assert (await asyncio.to_thread(ours, topic=other))["pub_counts"] == [{"topic": other, "count": 1}]
    # Unfiltered, nsqd reports the count of one topic only (it breaks out of its loop).
    assert len((await asyncio.to_thread(ours))["pub_counts"]) == 1
    text = (await asyncio.to_thread(get, address, f"/stats?topic={other}&include_mem=false")).body.decode()
    client_id = f"host:{mine['remote_address'].rpartition(':')[2]} ua/1"
    assert re.search(
        rf"\nProducers:\n(   .*\n)*   \[V2 {re.escape(f'{client_id:<21}')}\] msgs: 1        topics: "
        rf"{re.escape(other)}=1 connected: \d+s\n",
        text,
    ), text
    await producer.close()


def test_stats_text(address: str, topic: str) -> None:
    assert_empty(post(address, f"/topic/create?topic={topic}"))
    assert_empty(post(address, f"/channel/create?topic={topic}&channel=ch"))
    for body in (b"one", b"two"):
        assert_ok(post(address, f"/pub?topic={topic}", body))
    eventually(lambda: channel_stats(address, topic, "ch")["depth"] == 2)
    reply = get(address, f"/stats?topic={topic}&include_clients=false&include_mem=false")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == TEXT
    assert reply.headers["X-Nsq-Content-Type"] == NSQ_V1
    version, start_time, uptime, rest = reply.body.decode().split("\n", 3)
    assert re.fullmatch(r"nsqd v\d+\.\d+\.\d+\S* \(built w/\S+\)", version), version
    assert re.fullmatch(r"start_time \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(Z|[+-]\d\d:\d\d)", start_time), start_time
    # A Go duration: 1h2m3.456s, 3.5s, 12.5ms, 800µs.
    assert re.fullmatch(r"uptime ((\d+h)?(\d+m)?\d+(\.\d+)?s|\d+(\.\d+)?(ms|µs|ns))", uptime), uptime
    assert rest == (
        "\nHealth: OK\n"
        "\nTopics:"
        f"\n   [{topic:<15}] depth: 0     be-depth: 0     msgs: 2        e2e%: \n"
        f"      [{'ch':<25}] depth: 2     be-depth: 0     inflt: 0    def: 0    re-q: 0     timeout: 0     "
        "msgs: 2        e2e%: \n"
        "\nProducers: None\n"
    )


def test_stats_text_without_topics(address: str, topic: str) -> None:
    body = get(address, f"/stats?topic={topic}&include_clients=false&include_mem=false").body.decode()
    assert body.endswith("\nHealth: OK\n\nTopics: None\n\nProducers: None\n")


# --- /topic/* ---------------------------------------------------------------------


def test_topic_create_and_delete(address: str, topic: str) -> None:
    assert_empty(post(address, f"/topic/create?topic={topic}"))
    assert_empty(post(address, f"/topic/create?topic={topic}"))  # idempotent
    assert topic_stats(address, topic)["channels"] == []
    assert_empty(post(address, f"/topic/delete?topic={topic}"))
    assert topic_stats(address, topic) is None
    assert_error(post(address, f"/topic/delete?topic={topic}"), 404, "TOPIC_NOT_FOUND")


def test_ephemeral_topic_create(address: str, topic: str) -> None:
    assert_empty(post(address, f"/topic/create?topic={topic}%23ephemeral"))
    assert topic_stats(address, f"{topic}#ephemeral")["topic_name"] == f"{topic}#ephemeral"


def test_topic_delete_drops_its_channels(address: str, topic: str) -> None:
    assert_empty(post(address, f"/topic/create?topic={topic}"))
    assert_empty(post(address, f"/channel/create?topic={topic}&channel=ch"))
    assert_empty(post(address, f"/topic/delete?topic={topic}"))
    assert_empty(post(address, f"/topic/create?topic={topic}"))
    assert topic_stats(address, topic)["channels"] == []


def test_topic_empty(address: str, topic: str) -> None:
    for body in (b"a", b"b", b"c"):
        assert_ok(post(address, f"/pub?topic={topic}", body))
    assert topic_stats(address, topic)["depth"] == 3
    assert_empty(post(address, f"/topic/empty?topic={topic}"))
    assert (topic_stats(address, topic)["depth"], topic_stats(address, topic)["message_count"]) == (0, 3)


@pytest.mark.parametrize(
    ("route", "query", "status", "message"),
    [
        ("create", "", 400, "MISSING_ARG_TOPIC"),
        ("create", "topic=", 400, "INVALID_TOPIC"),
        ("create", "topic=a%20b", 400, "INVALID_TOPIC"),
        ("create", "topic=%zz", 400, "INVALID_REQUEST"),
        ("delete", "", 400, "MISSING_ARG_TOPIC"),
        ("delete", "topic=", 404, "TOPIC_NOT_FOUND"),  # delete does not check the name
        ("delete", "topic=a%20b", 404, "TOPIC_NOT_FOUND"),
        ("delete", "topic={topic}", 404, "TOPIC_NOT_FOUND"),
        ("delete", "topic=%zz", 400, "INVALID_REQUEST"),
        ("empty", "", 400, "MISSING_ARG_TOPIC"),
        ("empty", "topic=a%20b", 400, "INVALID_TOPIC"),
        ("empty", "topic={topic}", 404, "TOPIC_NOT_FOUND"),
        ("empty", "topic=a;b", 400, "INVALID_REQUEST"),
    ],
)
def test_topic_errors(address: str, topic: str, route: str, query: str, status: int, message: str) -> None:
    assert_error(post(address, f"/topic/{route}?" + query.format(topic=topic)), status, message)


# --- /channel/* -------------------------------------------------------------------


def test_channel_create_empty_and_delete(address: str, topic: str) -> None:
    # The topic must exist: /channel/create does not create it.
    assert_error(post(address, f"/channel/create?topic={topic}&channel=ch"), 404, "TOPIC_NOT_FOUND")
    assert topic_stats(address, topic) is None
    assert_empty(post(address, f"/topic/create?topic={topic}"))
    assert_empty(post(address, f"/channel/create?topic={topic}&channel=ch"))
    assert_empty(post(address, f"/channel/create?topic={topic}&channel=ch"))  # idempotent
    assert_empty(post(address, f"/channel/create?topic={topic}&channel=other%23ephemeral"))
    for body in (b"a", b"b"):
        assert_ok(post(address, f"/pub?topic={topic}", body))
    eventually(lambda: channel_stats(address, topic, "ch")["depth"] == 2)
    assert_empty(post(address, f"/channel/empty?topic={topic}&channel=ch"))
    assert channel_stats(address, topic, "ch")["depth"] == 0
    assert channel_stats(address, topic, "other#ephemeral")["depth"] == 2
    assert_empty(post(address, f"/channel/delete?topic={topic}&channel=ch"))
    assert channel_stats(address, topic, "ch") is None
    assert_error(post(address, f"/channel/delete?topic={topic}&channel=ch"), 404, "CHANNEL_NOT_FOUND")
    assert_error(post(address, f"/channel/empty?topic={topic}&channel=ch"), 404, "CHANNEL_NOT_FOUND")


@pytest.mark.parametrize("route", ["create", "delete", "empty"])
@pytest.mark.parametrize(
    ("query", "status", "message"),
    [
        ("channel=ch", 400, "MISSING_ARG_TOPIC"),
        ("topic=&channel=ch", 400, "INVALID_ARG_TOPIC"),
        ("topic=a%2Bb&channel=ch", 400, "INVALID_ARG_TOPIC"),
        ("topic={topic}", 400, "MISSING_ARG_CHANNEL"),
        ("topic={topic}&channel=", 400, "INVALID_ARG_CHANNEL"),
        ("topic={topic}&channel=" + "c" * 65, 400, "INVALID_ARG_CHANNEL"),
        ("topic={topic}&channel=ch", 404, "TOPIC_NOT_FOUND"),  # names are checked first
        ("topic={topic}&channel=%zz", 400, "INVALID_REQUEST"),
    ],
)
def test_channel_errors(address: str, topic: str, route: str, query: str, status: int, message: str) -> None:
    assert_error(post(address, f"/channel/{route}?" + query.format(topic=topic)), status, message)


# --- nsqlookupd's /lookup (embedded broker only) ----------------------------------


def test_lookup(embedded: BrokerAddresses, topic: str) -> None:
    address = embedded.http_address
    assert_error(get(address, f"/lookup?topic={topic}"), 404, "TOPIC_NOT_FOUND")
    assert_empty(post(address, f"/topic/create?topic={topic}"))
    reply = get(address, f"/lookup?topic={topic}")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == JSON
    assert reply.headers["X-Nsq-Content-Type"] == NSQ_V1
    info = get(address, "/info").json()
    producer = {
        "remote_address": embedded.tcp_address,
        "hostname": info["hostname"],
        "broadcast_address": info["broadcast_address"],
        "tcp_port": info["tcp_port"],
        "http_port": info["http_port"],
        "version": info["version"],
    }
    assert reply.body == json.dumps({"channels": [], "producers": [producer]}, separators=(",", ":")).encode()
    for channel in ("b", "a"):
        assert_empty(post(address, f"/channel/create?topic={topic}&channel={channel}"))
    found = get(address, f"/lookup?topic={topic}").json()
    assert (sorted(found["channels"]), found["producers"]) == (["a", "b"], [producer])
    assert_empty(post(address, f"/topic/delete?topic={topic}"))
    assert_error(get(address, f"/lookup?topic={topic}"), 404, "TOPIC_NOT_FOUND")


@pytest.mark.parametrize(
    ("query", "status", "message"),
    [
        ("", 400, "MISSING_ARG_TOPIC"),
        ("topic=", 404, "TOPIC_NOT_FOUND"),  # nsqlookupd does not check names
        ("topic=not%20valid", 404, "TOPIC_NOT_FOUND"),
        ("topic=%zz", 400, "INVALID_REQUEST"),
    ],
)
def test_lookup_errors(embedded: BrokerAddresses, query: str, status: int, message: str) -> None:
    assert_error(get(embedded.http_address, f"/lookup?{query}"), status, message)


def test_lookup_is_get_only(embedded: BrokerAddresses) -> None:
    assert_error(post(embedded.http_address, "/lookup?topic=x"), 405, "METHOD_NOT_ALLOWED")


def test_nodes_lists_the_broker_with_its_topics_as_nsqlookupd_does(embedded: BrokerAddresses, topic: str) -> None:
    address = embedded.http_address
    assert_empty(post(address, f"/topic/create?topic={topic}"))
    reply = get(address, "/nodes")
    assert (reply.status, reply.headers["Content-Type"]) == (200, JSON)
    (node,) = reply.json()["producers"]
    lookup = get(address, f"/lookup?topic={topic}").json()["producers"][0]
    assert {name: node[name] for name in lookup} == lookup
    assert topic in node["topics"] and node["topics"] == sorted(node["topics"])
    assert node["tombstones"] == [False] * len(node["topics"])
    assert_error(post(address, "/nodes"), 405, "METHOD_NOT_ALLOWED")


# --- HTTP/1.1 ---------------------------------------------------------------------


def test_keep_alive(address: str, topic: str) -> None:
    connection = http.client.HTTPConnection(*split_address(address), timeout=TIMEOUT)
    try:
        connection.request("GET", "/ping")
        first = connection.getresponse()
        assert (first.read(), first.getheader("Connection")) == (b"OK", None)
        sock = connection.sock
        connection.request("POST", f"/pub?topic={topic}", b"kept")
        assert connection.getresponse().read() == b"OK"
        connection.request("POST", f"/pub?topic={topic}", b"")  # an error does not close it either
        assert connection.getresponse().read() == error_body("MSG_EMPTY")
        assert connection.sock is sock is not None
    finally:
        connection.close()


def test_connection_close(address: str) -> None:
    reply = exchange(address, b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nConnection: close\r\n" in reply
    assert reply.endswith(b"\r\n\r\nOK")


def test_http_1_0(address: str) -> None:
    # Closed after the reply unless asked to keep alive.
    reply = exchange(address, b"GET /ping HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.0 200 OK\r\n") and reply.endswith(b"\r\n\r\nOK")
    with connect(address) as sock:
        stream = sock.makefile("rb")
        sock.sendall(b"GET /ping HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        reply_kept = read_response(stream)
        assert (reply_kept.body, reply_kept.headers["Connection"]) == (b"OK", "keep-alive")
        sock.sendall(b"GET /ping HTTP/1.0\r\n\r\n")
        assert read_response(stream).body == b"OK"
        assert stream.read() == b""


def test_pipelined_requests(address: str, topic: str) -> None:
    requests = (
        b"POST /pub?topic=%s HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc" % topic.encode()
        + b"\r\n"  # an old client's extra CRLF after a POST body is skipped
        + b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n"
        + b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
        + b"POST /topic/empty?topic=%s HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n" % topic.encode()
    )
    with connect(address) as sock:
        sock.sendall(requests)
        stream = sock.makefile("rb")
        replies = [read_response(stream) for _ in range(4)]
    assert_ok(replies[0])
    assert replies[1].body == b"OK"
    assert_error(replies[2], 404, "NOT_FOUND")
    assert_empty(replies[3])


def test_a_client_that_does_not_read_its_replies_is_no_longer_read(address: str, topic: str) -> None:
    # Go's server writes each reply before it reads the next request: once the client's socket
    # buffers are full it stops reading, where answering on would buffer replies without end.
    request = b"POST /pub?topic=%s HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx" % topic.encode()
    with connect(address) as sock:
        sock.settimeout(0.5)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            while time.monotonic() - started < TIMEOUT:
                sock.sendall(request * 1000)
        published = topic_stats(address, topic)["message_count"]
        time.sleep(0.3)
        assert topic_stats(address, topic)["message_count"] == published


def test_bare_newlines_end_header_lines(address: str) -> None:
    with connect(address) as sock:
        sock.sendall(b"GET /ping HTTP/1.1\nHost: x\n\n")
        assert read_response(sock.makefile("rb")).body == b"OK"


def test_chunked_body(address: str, topic: str) -> None:
    body = (
        b"4;name=value\r\none\n\r\n"  # a chunk extension is ignored
        b"A\r\ntwo\nthree\n\r\n"
        b"3 \r\nfou\r\n"  # so is whitespace after the size
        b"2\r\nr\n\r\n"
        b"0\r\nX-Trailer: ignored\r\n\r\n"
    )
    head = b"POST /mpub?topic=%s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" % topic.encode()
    with connect(address) as sock:
        sock.sendall(head + body + b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        stream = sock.makefile("rb")
        assert_ok(read_response(stream))
        assert read_response(stream).body == b"OK"
    assert topic_stats(address, topic)["message_count"] == 4


async def test_chunked_pub_is_one_message(almanet_broker: BrokerAddresses, topic: str) -> None:
    consumer = await RawConnection.consumer(almanet_broker.tcp_address, topic, "ch")
    chunks = [b"chunk", b"ed \n", b"body"]
    assert_ok(await asyncio.to_thread(post, almanet_broker.http_address, f"/pub?topic={topic}", iter(chunks)))
    assert (await consumer.message()).body == b"chunked \nbody"
    await consumer.close()


def test_request_arriving_byte_by_byte(address: str, topic: str) -> None:
    requests = (
        b"POST /mpub?topic=%s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" % topic.encode()
        + b"3\r\na\nb\r\n2\r\n\nc\r\n0\r\n\r\n"
        + b"POST /pub?topic=%s HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nlast" % topic.encode()
    )
    with connect(address) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in requests:
            sock.sendall(bytes([byte]))
        stream = sock.makefile("rb")
        assert_ok(read_response(stream))
        assert_ok(read_response(stream))
    assert topic_stats(address, topic)["message_count"] == 4


def test_malformed_chunked_body(address: str, topic: str) -> None:
    # nsqd's read of the body fails.
    request = b"POST /pub?topic=%s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n" % topic.encode()
    with connect(address) as sock:
        sock.sendall(request)
        assert_error(read_response(sock.makefile("rb")), 500, "INTERNAL_ERROR")


def test_expect_100_continue(address: str, topic: str) -> None:
    with connect(address) as sock:
        stream = sock.makefile("rb")
        head = b"POST /pub?topic=%s HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        sock.sendall(head % topic.encode())
        assert stream.readline() == b"HTTP/1.1 100 Continue\r\n"
        assert stream.readline() == b"\r\n"
        sock.sendall(b"hello")
        assert_ok(read_response(stream))
        # Again on the same connection, chunked.
        chunked_head = (
            b"POST /pub?topic=%s HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        sock.sendall(chunked_head % topic.encode())
        assert stream.readline() == b"HTTP/1.1 100 Continue\r\n"
        assert stream.readline() == b"\r\n"
        sock.sendall(b"5\r\nagain\r\n0\r\n\r\n")
        assert_ok(read_response(stream))
    assert topic_stats(address, topic)["message_count"] == 2


def test_expect_100_continue_refused(address: str, topic: str) -> None:
    # A body that is refused unread gets no 100 Continue: the final reply comes at once.
    head = b"POST /pub?topic=%s HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
    with connect(address) as sock:
        sock.sendall(head % (topic.encode(), DEFAULT_MAX_MSG_SIZE + 1))
        assert_error(read_response(sock.makefile("rb")), 413, "MSG_TOO_BIG")


def test_unknown_expectation(address: str) -> None:
    reply = exchange(address, b"POST /pub HTTP/1.1\r\nHost: x\r\nExpect: something\r\nContent-Length: 1\r\n\r\nx")
    assert reply.startswith(b"HTTP/1.1 417 ")


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET /ping\r\n\r\n",
        b"GET  /ping HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET ping HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /ping HTTP/1.1 extra\r\nHost: x\r\n\r\n",
        b"GET /ping http/1.1\r\nHost: x\r\n\r\n",
        b"G(T /ping HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /p%zzing HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /ping\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /ping HTTP/1.1\r\n\r\n",  # HTTP/1.1 requires Host
        b"GET /ping HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
        b"GET /ping HTTP/1.1\r\nHost: x\r\nno colon\r\n\r\n",
        b"GET /ping HTTP/1.1\r\nHost: x\r\nbad name: 1\r\n\r\n",
        b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n",
        b"POST /pub?topic=t HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"POST /pub?topic=t HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"POST /pub?topic=t HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n\r\n",  # a digit to Python's isdigit()
        b"POST /pub?topic=t HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
        b"POST /pub?topic=t HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n\n",  # TLS hello-ish
    ],
)
@pytest.mark.usefixtures("no_broker_errors")
def test_garbage_is_refused_and_closed(address: str, request_bytes: bytes) -> None:
    reply = exchange(address, request_bytes)
    # Go versions differ on whether the status line says why too ("400 Bad Request: missing required Host header").
    assert reply.startswith(b"HTTP/1.1 400 Bad Request"), reply
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"\r\nConnection: close" in head
    assert body.startswith(b"400 Bad Request"), reply


@pytest.mark.usefixtures("no_broker_errors")
def test_bad_request_line_is_refused_before_headers(address: str) -> None:
    # An NSQ client on the HTTP port: its magic and first command, then it waits for a frame.
    with connect(address) as sock:
        sock.sendall(b"  V2IDENTIFY\n")
        assert read_until_closed(sock).startswith(b"HTTP/1.1 400 Bad Request\r\n")


def test_unsupported_http_version(address: str) -> None:
    assert exchange(address, b"GET /ping HTTP/3.0\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 505 ")


def test_unsupported_transfer_encoding(address: str) -> None:
    reply = exchange(address, b"POST /pub?topic=t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 501 ")


def test_head_too_big(address: str) -> None:
    with connect(address) as sock:
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * (1024 * 1024 + 8192) + b"\r\n\r\n")
        assert re.match(rb"HTTP/1\.[01] 431 ", read_until_closed(sock))


@pytest.mark.usefixtures("no_broker_errors")
def test_client_gone_mid_request(address: str, topic: str) -> None:
    partial_body = b"POST /pub?topic=%s HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc" % topic.encode()
    for partial in (partial_body, b"GET /pi"):
        with connect(address) as sock:
            sock.sendall(partial)
    assert get(address, "/ping").body == b"OK"
    assert topic_stats(address, topic) is None


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl(address: str, topic: str) -> None:
    def curl(*args: str, data: bytes | None = None) -> bytes:
        command = ["curl", "-sS", "--max-time", str(TIMEOUT), *args]
        return subprocess.run(command, input=data, capture_output=True, check=True, timeout=TIMEOUT * 2).stdout

    url = f"http://{address}/pub?topic={topic}"
    assert curl("-d", "hello", url) == b"OK"
    assert curl("-H", "Transfer-Encoding: chunked", "-d", "chunked", url) == b"OK"
    started = time.monotonic()
    assert curl("-H", "Expect: 100-continue", "-d", "expected", url) == b"OK"
    assert time.monotonic() - started < 0.9  # curl waits 1 s for a 100 Continue that does not come
    assert curl("-w", " %{http_code}", "-d", "", url) == error_body("MSG_EMPTY") + b" 400"
    # Above 1 MB curl asks for 100 Continue, and gets the refusal instead.
    big = b"b" * (DEFAULT_MAX_MSG_SIZE + 1)
    assert curl("-w", " %{http_code}", "--data-binary", "@-", url, data=big) == error_body("MSG_TOO_BIG") + b" 413"
    assert curl(f"http://{address}/stats?format=json&topic={topic}&include_mem=false").startswith(b'{"version":')
    assert topic_stats(address, topic)["message_count"] == 3


# --- limits of an embedded broker of its own --------------------------------------


@pytest.mark.usefixtures("no_broker_errors")
def test_small_message_limit(small_broker: str, topic: str) -> None:
    assert_ok(post(small_broker, f"/pub?topic={topic}", b"m" * 10))
    assert_error(post(small_broker, f"/pub?topic={topic}", b"m" * 11), 413, "MSG_TOO_BIG")
    assert_error(post(small_broker, f"/pub?topic={topic}", iter([b"m" * 5, b"m" * 6])), 413, "MSG_TOO_BIG")
    assert_error(post(small_broker, f"/pub?topic={topic}", iter([b"m" * 30, b"m" * 30])), 413, "MSG_TOO_BIG")
    assert_error(post(small_broker, f"/mpub?topic={topic}", b"ok\n" + b"m" * 11), 413, "MSG_TOO_BIG")
    assert_error(post(small_broker, f"/mpub?topic={topic}&binary=1", binary_mpub(b"m" * 11)), 413, "BAD_MESSAGE")
    assert topic_stats(small_broker, topic)["message_count"] == 1


@pytest.mark.usefixtures("no_broker_errors")
def test_small_body_limit(small_broker: str, topic: str) -> None:
    assert_ok(post(small_broker, f"/mpub?topic={topic}", b"123456789\n" * 4))  # 40 bytes
    assert_error(post(small_broker, f"/mpub?topic={topic}", b"123456789\n" * 4 + b"x"), 413, "BODY_TOO_BIG")
    chunks = iter([b"123456789\n"] * 5)
    assert_error(post(small_broker, f"/mpub?topic={topic}", chunks), 413, "BODY_TOO_BIG")
    assert_error(post(small_broker, f"/mpub?topic={topic}&binary=1", binary_mpub(b"m", count=8)), 413, "BAD_BODY")
    assert topic_stats(small_broker, topic)["message_count"] == 4


@pytest.mark.usefixtures("no_broker_errors")
def test_refused_body_is_drained_before_closing(small_broker: str, topic: str) -> None:
    # Refused on its declared length: the broker answers at once, then reads and drops the
    # rest, so the client can send it all and still read the reply instead of a reset.
    for path, message in (("/pub", "MSG_TOO_BIG"), ("/mpub", "BODY_TOO_BIG")):
        reply = call(small_broker, "POST", f"{path}?topic={topic}", b"m\n" * 1_000_000)
        assert_error(reply, 413, message)
        assert reply.headers["Connection"] == "close"
    # A body refused once read leaves the connection usable.
    connection = http.client.HTTPConnection(*split_address(small_broker), timeout=TIMEOUT)
    try:
        connection.request("POST", f"/mpub?topic={topic}", b"m" * 30)
        response = connection.getresponse()
        assert (response.read(), response.getheader("Connection")) == (error_body("MSG_TOO_BIG"), None)
        connection.request("GET", "/ping")
        assert connection.getresponse().read() == b"OK"
    finally:
        connection.close()


def test_full_memory_queue(small_broker: str, topic: str) -> None:
    # Where nsqd would spill to disk, the embedded broker refuses the publish, all or nothing.
    assert_ok(post(small_broker, f"/mpub?topic={topic}", b"1\n2\n3\n4"))
    assert_error(post(small_broker, f"/mpub?topic={topic}", b"5\n6"), 503, "MEM_QUEUE_FULL")
    assert_ok(post(small_broker, f"/pub?topic={topic}", b"5"))
    assert_error(post(small_broker, f"/pub?topic={topic}", b"6"), 503, "MEM_QUEUE_FULL")
    assert topic_stats(small_broker, topic)["depth"] == 5


def test_defer_limit_is_max_req_timeout(small_broker: str, topic: str) -> None:
    assert_ok(post(small_broker, f"/pub?topic={topic}&defer=1000", b"x"))
    assert_error(post(small_broker, f"/pub?topic={topic}&defer=1001", b"x"), 400, "INVALID_DEFER")


def test_an_ephemeral_topic_or_channel_drops_what_its_memory_queue_cannot_hold(small_broker: str, topic: str) -> None:
    """nsqd's ephemeral queues have no disk behind them: the overflow is dropped, the publish still OK."""
    for _ in range(8):
        assert_ok(post(small_broker, f"/pub?topic={topic}%23ephemeral", b"m"))
    assert topic_stats(small_broker, f"{topic}#ephemeral")["depth"] == 5
    assert_empty(post(small_broker, f"/topic/create?topic={topic}"))
    assert_empty(post(small_broker, f"/channel/create?topic={topic}&channel=c%23ephemeral"))
    for _ in range(8):
        assert_ok(post(small_broker, f"/pub?topic={topic}", b"m"))
    assert channel_stats(small_broker, topic, "c#ephemeral")["depth"] == 5
