"""nsqd's TCP protocol V2 as the broker speaks it, over real sockets.

Every test here runs against the shared brokers of the ``almanet_broker``
fixture, the embedded one and nsqd, so they assert only what nsqd does
(error texts are nsqd's, from its source). Timing tests use nsqd's smallest
settings (1 s msg_timeout and heartbeat interval) and wait for events, never
sleep longer than the behaviour needs; deferred and timed-out messages may
come back up to ``QUEUE_SCAN_LATENESS`` late.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.parse
import urllib.request
from typing import Any

import pytest
from rawnsq import QUEUE_SCAN_LATENESS, TIMEOUT, RawConnection

from almanet._speedups.frames import (
    ErrorFrame,
    ResponseFrame,
    encode_auth,
    encode_dpub,
    encode_fin,
    encode_identify,
    encode_mpub,
    encode_pub,
    encode_rdy,
    encode_req,
    encode_sub,
    encode_touch,
)
from almanet.pytest_plugin import BrokerAddresses
from almanet.wire.protocol import CLOSE_WAIT, CLS, HEARTBEAT, NOP, OK

pytestmark = pytest.mark.asyncio


def channel_stats(broker: BrokerAddresses, topic: str) -> dict[str, dict[str, Any]] | None:
    """The channels of ``topic`` from ``/stats?format=json``, by name; None when the topic does not exist."""
    url = f"http://{broker.http_address}/stats?format=json&topic={urllib.parse.quote(topic)}"
    with urllib.request.urlopen(url, timeout=5) as response:
        topics = json.load(response)["topics"]
    if not topics:
        return None
    return {channel["channel_name"]: channel for channel in topics[0]["channels"]}


async def publish(address: str, topic: str, *bodies: bytes) -> None:
    connection = await RawConnection.open(address)
    for body in bodies:
        connection.send(encode_pub(topic, body))
    for _ in bodies:
        assert await connection.frame() == ResponseFrame(OK)
    await connection.close()


async def wait_until(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# --- handshake --------------------------------------------------------------


async def test_bad_magic_is_refused(tcp: str) -> None:
    connection = await RawConnection.open(tcp, magic=False)
    connection.send(b"  V1")
    assert await connection.error_then_closed() == b"E_BAD_PROTOCOL"


async def test_command_before_magic_is_refused(tcp: str) -> None:
    connection = await RawConnection.open(tcp, magic=False)
    connection.send(b"NOP\n")
    assert await connection.error_then_closed() == b"E_BAD_PROTOCOL"


async def test_identify_negotiates_features(tcp: str) -> None:
    connection = await RawConnection.open(tcp)
    negotiated = await connection.identify(msg_timeout=5000, output_buffer_size=4096, output_buffer_timeout=100)
    expected = {
        "max_rdy_count": 2500,
        "max_msg_timeout": 900000,
        "msg_timeout": 5000,
        "tls_v1": False,
        "deflate": False,
        "deflate_level": 6,
        "max_deflate_level": 6,
        "snappy": False,
        "sample_rate": 0,
        "auth_required": False,
        "output_buffer_size": 4096,
        "output_buffer_timeout": 100,
    }
    assert {key: negotiated[key] for key in expected} == expected
    assert isinstance(negotiated["version"], str)
    await connection.close()


async def test_identify_without_feature_negotiation_answers_ok(tcp: str) -> None:
    connection = await RawConnection.open(tcp)
    connection.send(encode_identify({"client_id": "plain"}))
    assert await connection.frame() == ResponseFrame(OK)
    await connection.close()


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        ({"heartbeat_interval": 999}, b"E_BAD_BODY IDENTIFY heartbeat interval (999) is invalid"),
        ({"heartbeat_interval": 60001}, b"E_BAD_BODY IDENTIFY heartbeat interval (60001) is invalid"),
        ({"output_buffer_timeout": 1}, b"E_BAD_BODY IDENTIFY output buffer timeout (1) is invalid"),
        ({"output_buffer_size": 63}, b"E_BAD_BODY IDENTIFY output buffer size (63) is invalid"),
        ({"sample_rate": 100}, b"E_BAD_BODY IDENTIFY sample rate (100) is invalid"),
        ({"msg_timeout": 999}, b"E_BAD_BODY IDENTIFY msg timeout (999) is invalid"),
        ({"msg_timeout": 900001}, b"E_BAD_BODY IDENTIFY msg timeout (900001) is invalid"),
        ({"heartbeat_interval": "1000"}, b"E_BAD_BODY IDENTIFY failed to decode JSON body"),
        ({"client_id": 7}, b"E_BAD_BODY IDENTIFY failed to decode JSON body"),
        ({"msg_timeout": 1000.5}, b"E_BAD_BODY IDENTIFY failed to decode JSON body"),
    ],
)
async def test_identify_refuses_invalid_settings(tcp: str, settings: dict[str, Any], error: bytes) -> None:
    connection = await RawConnection.open(tcp)
    connection.send(encode_identify(settings))
    assert await connection.error_then_closed() == error


@pytest.mark.parametrize("body", [b"{", b"[1]", b'"text"', b"\xff\xfe", b"[" * 100_000])
async def test_identify_refuses_a_body_that_is_not_a_json_object(tcp: str, body: bytes) -> None:
    connection = await RawConnection.open(tcp)
    connection.send(b"IDENTIFY\n" + len(body).to_bytes(4, "big") + body)
    assert await connection.error_then_closed() == b"E_BAD_BODY IDENTIFY failed to decode JSON body"


async def test_identify_ignores_unknown_fields(tcp: str) -> None:
    connection = await RawConnection.open(tcp)
    negotiated = await connection.identify(some_future_field={"x": 1}, long_id="old client")
    assert negotiated["max_rdy_count"] > 0
    await connection.close()


async def test_identify_reads_a_lone_surrogate_escape_as_a_replacement_character(
    almanet_broker: BrokerAddresses, tcp: str, topic: str
) -> None:
    connection = await RawConnection.open(tcp)
    body = b'{"hostname": "\\ud800host"}'
    connection.send(b"IDENTIFY\n" + len(body).to_bytes(4, "big") + body)
    assert await connection.frame() == ResponseFrame(OK)
    connection.send(encode_sub(topic, "c"))
    assert await connection.frame() == ResponseFrame(OK)
    assert [client["hostname"] for client in (channel_stats(almanet_broker, topic) or {})["c"]["clients"]] == [
        "\ufffdhost"
    ]
    url = f"http://{almanet_broker.http_address}/stats?topic={urllib.parse.quote(topic)}"
    with urllib.request.urlopen(url, timeout=5) as response:
        assert "\ufffdhost" in response.read().decode()
    await connection.close()


async def test_identify_after_sub_is_refused(tcp: str, topic: str) -> None:
    connection = await RawConnection.consumer(tcp, topic, "c", rdy=0)
    connection.send(encode_identify({}))
    assert await connection.error_then_closed() == b"E_INVALID cannot IDENTIFY in current state"


async def test_auth_when_the_broker_requires_none(tcp: str) -> None:
    connection = await RawConnection.open(tcp)
    connection.send(encode_auth(b"secret"))
    assert await connection.error_then_closed() == b"E_AUTH_DISABLED AUTH disabled"


async def test_unknown_command_is_refused(tcp: str) -> None:
    connection = await RawConnection.open(tcp)
    connection.send(b"HELLO world\n")
    assert await connection.error_then_closed() == b"E_INVALID invalid command HELLO"


# --- heartbeats -------------------------------------------------------------


async def test_heartbeats_come_every_interval_and_nop_keeps_the_connection(tcp: str) -> None:
    connection = await RawConnection.open(tcp)
    await connection.identify(heartbeat_interval=1000)
    started = time.monotonic()
    for _ in range(3):
        assert await connection.frame(heartbeats=True) == ResponseFrame(HEARTBEAT)
        connection.send(NOP)  # NOP gets no reply
    assert time.monotonic() - started == pytest.approx(3.0, abs=0.5)
    await connection.close()


async def test_a_client_silent_for_two_heartbeat_intervals_is_closed(tcp: str) -> None:
    connection = await RawConnection.open(tcp)
    await connection.identify(heartbeat_interval=1000)
    started = time.monotonic()
    await connection.closed()
    assert 1.8 <= time.monotonic() - started <= 2.8


async def test_the_read_deadline_runs_from_command_to_command(tcp: str, topic: str) -> None:
    connection = await RawConnection.open(tcp)
    await connection.identify(heartbeat_interval=1000)
    started = time.monotonic()
    connection.send(b"PUB " + topic.encode() + b"\n" + (25).to_bytes(4, "big"))

    async def trickle() -> None:  # the body, a byte at a time: 5 s in all
        for _ in range(25):
            connection.send(b"x")
            await asyncio.sleep(0.2)

    trickling = asyncio.ensure_future(trickle())
    try:
        # nsqd: two heartbeat intervals after the IDENTIFY, in the middle of the body.
        assert await connection.error_then_closed() == b"E_BAD_MESSAGE PUB failed to read message body"
        assert time.monotonic() - started < 3
    finally:
        trickling.cancel()


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"PUB t\n\x00\x00", b"E_BAD_MESSAGE PUB failed to read message body size"),
        (b"PUB t\n\x00\x00\x00\x05ab", b"E_BAD_MESSAGE PUB failed to read message body"),
        (b"DPUB t 10\n", b"E_BAD_MESSAGE DPUB failed to read message body size"),
        (b"IDENTIFY\n\x00\x00\x00\x10{", b"E_BAD_BODY IDENTIFY failed to read body"),
        (b"MPUB t\n\x00\x00\x00\x20\x00\x00", b"E_BAD_BODY MPUB failed to read message count"),
        (
            b"MPUB t\n\x00\x00\x00\x20\x00\x00\x00\x02\x00\x00\x00\x01a\x00",
            b"E_BAD_MESSAGE MPUB failed to read message(1) body size",
        ),
        (
            b"MPUB t\n\x00\x00\x00\x20\x00\x00\x00\x02\x00\x00\x00\x05ab",
            b"E_BAD_MESSAGE MPUB failed to read message body",
        ),
    ],
)
async def test_a_body_cut_short_by_the_end_of_the_stream_is_refused(tcp: str, data: bytes, error: bytes) -> None:
    connection = await RawConnection.open(tcp)
    connection.send(data)
    connection.send_eof()
    assert await connection.error_then_closed() == error


async def test_a_command_line_cut_short_by_the_end_of_the_stream_gets_no_answer(tcp: str) -> None:
    connection = await RawConnection.open(tcp)
    connection.send(encode_pub("t", b"done") + b"PUB t")
    connection.send_eof()
    assert await connection.frame() == ResponseFrame(OK)  # what came before is answered
    await connection.closed()


async def test_sub_needs_heartbeats(tcp: str, topic: str) -> None:
    connection = await RawConnection.open(tcp)
    await connection.identify(heartbeat_interval=-1)
    connection.send(encode_sub(topic, "c"))
    assert await connection.error_then_closed() == b"E_INVALID cannot SUB with heartbeats disabled"


# --- SUB and RDY --------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"SUB only.topic\n", b"E_INVALID SUB insufficient number of parameters"),
        (b"SUB bad!topic c\n", b'E_BAD_TOPIC SUB topic name "bad!topic" is not valid'),
        (b"SUB t bad/channel\n", b'E_BAD_CHANNEL SUB channel name "bad/channel" is not valid'),
        (b"SUB t " + b"c" * 65 + b"\n", b'E_BAD_CHANNEL SUB channel name "' + b"c" * 65 + b'" is not valid'),
    ],
)
async def test_sub_refuses_bad_parameters(tcp: str, line: bytes, error: bytes) -> None:
    connection = await RawConnection.open(tcp)
    connection.send(line)
    assert await connection.error_then_closed() == error


async def test_sub_twice_is_refused(tcp: str, topic: str) -> None:
    connection = await RawConnection.consumer(tcp, topic, "c", rdy=0)
    connection.send(encode_sub(topic, "d"))
    assert await connection.error_then_closed() == b"E_INVALID cannot SUB in current state"


@pytest.mark.parametrize(
    ("command", "error"),
    [
        (b"RDY 1\n", b"E_INVALID cannot RDY in current state"),
        (b"FIN 0123456789abcdef\n", b"E_INVALID cannot FIN in current state"),
        (b"REQ 0123456789abcdef 0\n", b"E_INVALID cannot REQ in current state"),
        (b"TOUCH 0123456789abcdef\n", b"E_INVALID cannot TOUCH in current state"),
        (CLS, b"E_INVALID cannot CLS in current state"),
    ],
)
async def test_consumer_commands_before_sub_are_refused(tcp: str, command: bytes, error: bytes) -> None:
    connection = await RawConnection.open(tcp)
    connection.send(command)
    assert await connection.error_then_closed() == error


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"RDY 2501\n", b"E_INVALID RDY count 2501 out of range 0-2500"),
        (b"RDY -1\n", b"E_INVALID RDY could not parse count -1"),
        (b"RDY many\n", b"E_INVALID RDY could not parse count many"),
    ],
)
async def test_rdy_out_of_range_closes_the_connection(tcp: str, topic: str, line: bytes, error: bytes) -> None:
    connection = await RawConnection.consumer(tcp, topic, "c", rdy=0)
    connection.send(line)
    assert await connection.error_then_closed() == error


async def test_rdy_bounds_the_messages_in_flight(tcp: str, topic: str) -> None:
    await publish(tcp, topic, *[b"%d" % n for n in range(5)])
    connection = await RawConnection.consumer(tcp, topic, "c", rdy=2)
    first = await connection.messages(2)
    await connection.nothing()
    connection.send(encode_fin(first[0].id))
    third = await connection.message()
    await connection.nothing()
    connection.send(encode_rdy(0))
    connection.send(encode_fin(first[1].id) + encode_fin(third.id))
    await connection.nothing()
    connection.send(encode_rdy(10))
    rest = await connection.messages(2)
    assert [m.body for m in [*first, third, *rest]] == [b"0", b"1", b"2", b"3", b"4"]
    await connection.close()


async def test_rdy_without_a_count_means_one(tcp: str, topic: str) -> None:
    await publish(tcp, topic, b"a", b"b")
    connection = await RawConnection.consumer(tcp, topic, "c", rdy=0)
    connection.send(b"RDY\n")
    assert (await connection.message()).body == b"a"
    await connection.nothing()
    await connection.close()


# --- FIN, REQ, TOUCH ----------------------------------------------------------


async def test_fin_of_an_unknown_id_leaves_the_connection_open(tcp: str, topic: str) -> None:
    connection = await RawConnection.consumer(tcp, topic, "c")
    connection.send(encode_fin(b"0123456789abcdef"))
    assert await connection.frame() == ErrorFrame(b"E_FIN_FAILED FIN 0123456789abcdef failed ID not in flight")
    connection.send(encode_req(b"0123456789abcdef", 0))
    assert await connection.frame() == ErrorFrame(b"E_REQ_FAILED REQ 0123456789abcdef failed ID not in flight")
    connection.send(encode_touch(b"0123456789abcdef"))
    assert await connection.frame() == ErrorFrame(b"E_TOUCH_FAILED TOUCH 0123456789abcdef failed ID not in flight")
    await publish(tcp, topic, b"still subscribed")
    assert (await connection.message()).body == b"still subscribed"
    await connection.close()


async def test_fin_of_a_message_another_client_holds(tcp: str, topic: str) -> None:
    holder = await RawConnection.consumer(tcp, topic, "c")
    other = await RawConnection.consumer(tcp, topic, "c", rdy=0)
    await publish(tcp, topic, b"mine")
    message = await holder.message()
    other.send(encode_fin(message.id))
    expected = b"E_FIN_FAILED FIN " + message.id + b" failed client does not own message"
    assert await other.frame() == ErrorFrame(expected)
    holder.send(encode_fin(message.id))
    await holder.nothing()
    await holder.close()
    await other.close()


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b"FIN short\n", b"E_INVALID invalid message ID"),
        (b"FIN\n", b"E_INVALID FIN insufficient number of params"),
        (b"REQ 0123456789abcdef\n", b"E_INVALID REQ insufficient number of params"),
        (b"REQ 0123456789abcdef soon\n", b"E_INVALID REQ could not parse timeout soon"),
        (b"TOUCH 0123456789abcdef0\n", b"E_INVALID invalid message ID"),
    ],
)
async def test_malformed_fin_req_touch_close_the_connection(tcp: str, topic: str, line: bytes, error: bytes) -> None:
    connection = await RawConnection.consumer(tcp, topic, "c")
    connection.send(line)
    assert await connection.error_then_closed() == error


async def test_req_redelivers_with_attempts_counted(tcp: str, topic: str) -> None:
    await publish(tcp, topic, b"again")
    connection = await RawConnection.consumer(tcp, topic, "c")
    for attempt in (1, 2, 3):
        message = await connection.message()
        assert (message.body, message.attempts) == (b"again", attempt)
        connection.send(encode_req(message.id, 0))
    message = await connection.message()
    assert message.attempts == 4
    connection.send(encode_fin(message.id))
    await connection.nothing()
    await connection.close()


async def test_req_with_a_delay_redelivers_after_it(tcp: str, topic: str) -> None:
    await publish(tcp, topic, b"later")
    connection = await RawConnection.consumer(tcp, topic, "c")
    message = await connection.message()
    requeued = time.monotonic()
    connection.send(encode_req(message.id, 500))
    again = await connection.message(TIMEOUT + QUEUE_SCAN_LATENESS)
    assert time.monotonic() - requeued >= 0.45
    assert (again.id, again.attempts) == (message.id, 2)
    connection.send(encode_fin(again.id))
    await connection.close()


async def test_msg_timeout_redelivers_what_was_never_finished(tcp: str, topic: str) -> None:
    await publish(tcp, topic, b"slow")
    connection = await RawConnection.consumer(tcp, topic, "c", msg_timeout=1000)
    message = await connection.message()
    sent = time.monotonic()
    again = await connection.message(TIMEOUT + QUEUE_SCAN_LATENESS)
    assert time.monotonic() - sent >= 0.9
    assert (again.id, again.attempts) == (message.id, 2)
    connection.send(encode_fin(message.id))
    await connection.close()


async def test_touch_extends_the_msg_timeout(tcp: str, topic: str) -> None:
    await publish(tcp, topic, b"touched")
    connection = await RawConnection.consumer(tcp, topic, "c", msg_timeout=1000)
    message = await connection.message()
    await asyncio.sleep(0.6)
    connection.send(encode_touch(message.id))
    touched = time.monotonic()
    await connection.nothing(0.7)  # past the original deadline
    again = await connection.message(TIMEOUT + QUEUE_SCAN_LATENESS)
    assert time.monotonic() - touched >= 0.9
    assert again.attempts == 2
    connection.send(encode_fin(again.id))
    await connection.close()


async def test_each_message_times_out_no_sooner_than_its_own_msg_timeout(tcp: str, topic: str) -> None:
    # Unbuffered: each message reaches the test when the broker starts its clock.
    connection = await RawConnection.consumer(tcp, topic, "c", rdy=2, msg_timeout=1000, output_buffer_size=-1)
    await publish(tcp, topic, b"first")
    await connection.message()
    first_delivered = time.monotonic()
    await asyncio.sleep(0.3)
    await publish(tcp, topic, b"second")
    await connection.message()
    second_delivered = time.monotonic()
    first = await connection.message(TIMEOUT + QUEUE_SCAN_LATENESS)
    first_back = time.monotonic()
    second = await connection.message(TIMEOUT + QUEUE_SCAN_LATENESS)
    second_back = time.monotonic()
    assert [first.body, second.body] == [b"first", b"second"]  # in the order of their deadlines
    assert first_back - first_delivered >= 0.95
    assert second_back - second_delivered >= 0.95
    connection.send(encode_fin(first.id) + encode_fin(second.id))
    await connection.close()


async def test_cls_stops_deliveries_but_fin_still_works(almanet_broker: BrokerAddresses, tcp: str, topic: str) -> None:
    connection = await RawConnection.consumer(tcp, topic, "c", rdy=10)
    await publish(tcp, topic, b"held")
    message = await connection.message()
    connection.send(CLS)
    assert await connection.frame() == ResponseFrame(CLOSE_WAIT)
    connection.send(encode_rdy(5))  # ignored once closing
    await publish(tcp, topic, b"not for a closing client")
    await connection.nothing()
    connection.send(encode_fin(message.id))
    await wait_until(lambda: (channel_stats(almanet_broker, topic) or {})["c"]["in_flight_count"] == 0)
    await connection.close()
    taker = await RawConnection.consumer(tcp, topic, "c")
    assert (await taker.message()).body == b"not for a closing client"
    await taker.close()


# --- publishing ---------------------------------------------------------------


async def test_publishes_are_answered_in_order(tcp: str, topic: str) -> None:
    connection = await RawConnection.open(tcp)
    for n in range(100):
        connection.send(encode_pub(topic, b"%d" % n) + encode_mpub(topic, [b"x", b"y"]) + encode_dpub(topic, 0, b"d"))
    for _ in range(300):
        assert await connection.frame() == ResponseFrame(OK)
    connection.send(b"PUB bad!topic\n\x00\x00\x00\x01x")
    assert await connection.error_then_closed() == b'E_BAD_TOPIC PUB topic name "bad!topic" is not valid'
    consumer = await RawConnection.consumer(tcp, topic, "c", rdy=400)
    bodies = [message.body for message in await consumer.messages(400)]
    assert [body for body in bodies if body not in (b"x", b"y", b"d")] == [b"%d" % n for n in range(100)]
    await consumer.close()


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"PUB t\n\x00\x00\x00\x00", b"E_BAD_MESSAGE PUB invalid message body size 0"),
        (b"PUB t\n\x00\x10\x00\x01", b"E_BAD_MESSAGE PUB message too big 1048577 > 1048576"),
        (b"PUB\n", b"E_INVALID PUB insufficient number of parameters"),
        (b"DPUB t 3600001\n\x00\x00\x00\x01x", b"E_INVALID DPUB timeout 3600001 out of range 0-3600000"),
        (b"DPUB t soon\n\x00\x00\x00\x01x", b"E_INVALID DPUB could not parse timeout soon"),
        (b"MPUB t\n\x00\x50\x00\x01", b"E_BAD_BODY MPUB body too big 5242881 > 5242880"),
        (b"MPUB t\n\x00\x00\x00\x04\x00\x00\x00\x00", b"E_BAD_BODY MPUB invalid message count 0"),
    ],
)
async def test_bad_publishes_close_the_connection(tcp: str, data: bytes, error: bytes) -> None:
    connection = await RawConnection.open(tcp)
    connection.send(data)
    assert await connection.error_then_closed() == error


async def test_mpub_is_all_or_nothing(almanet_broker: BrokerAddresses, tcp: str, topic: str) -> None:
    connection = await RawConnection.open(tcp)
    body = b"\x00\x00\x00\x02" + b"\x00\x00\x00\x02ok" + b"\x00\x00\x00\x00"
    connection.send(b"MPUB " + topic.encode() + b"\n" + len(body).to_bytes(4, "big") + body)
    assert await connection.error_then_closed() == b"E_BAD_MESSAGE MPUB invalid message(1) body size 0"
    consumer = await RawConnection.consumer(tcp, topic, "c")
    await publish(tcp, topic, b"first")
    assert (await consumer.message()).body == b"first"
    await consumer.close()


async def test_dpub_delivers_after_the_defer(tcp: str, topic: str) -> None:
    consumer = await RawConnection.consumer(tcp, topic, "c", rdy=5)
    publisher = await RawConnection.open(tcp)
    publisher.send(encode_dpub(topic, 500, b"deferred") + encode_pub(topic, b"now"))
    published = time.monotonic()
    assert await publisher.frame() == ResponseFrame(OK)
    assert (await consumer.message()).body == b"now"
    deferred = await consumer.message(TIMEOUT + QUEUE_SCAN_LATENESS)
    assert (deferred.body, deferred.attempts) == (b"deferred", 1)
    assert time.monotonic() - published >= 0.45
    await publisher.close()
    await consumer.close()


# --- topics and channels --------------------------------------------------------


async def test_each_channel_gets_every_message(tcp: str, topic: str) -> None:
    first = await RawConnection.consumer(tcp, topic, "first", rdy=10)
    second = await RawConnection.consumer(tcp, topic, "second", rdy=10)
    await publish(tcp, topic, b"a", b"b", b"c")
    one = await first.messages(3)
    two = await second.messages(3)
    assert [m.body for m in one] == [m.body for m in two] == [b"a", b"b", b"c"]
    assert [m.id for m in one] == [m.id for m in two]  # channel copies share the id
    await first.close()
    await second.close()


async def test_a_channel_shares_messages_among_its_consumers(
    almanet_broker: BrokerAddresses, tcp: str, topic: str
) -> None:
    # Unbuffered, so that a short wait tells a consumer has nothing more.
    consumers = [await RawConnection.consumer(tcp, topic, "shared", rdy=100, output_buffer_size=-1) for _ in range(2)]
    # RDY has no reply: wait until the broker has both, or one may take everything.
    await wait_until(
        lambda: (
            [client["ready_count"] for client in (channel_stats(almanet_broker, topic) or {})["shared"]["clients"]]
            == [100, 100]
        )
    )
    await publish(tcp, topic, *[b"%d" % n for n in range(40)])

    async def drain(consumer: RawConnection) -> list[bytes]:
        bodies = []
        with contextlib.suppress(asyncio.TimeoutError):
            while True:
                bodies.append((await consumer.message(0.3)).body)
        return bodies

    received = await asyncio.gather(*map(drain, consumers))
    assert all(received), "both consumers get messages"
    assert sorted(received[0] + received[1], key=int) == [b"%d" % n for n in range(40)]
    for consumer in consumers:
        await consumer.close()


async def test_messages_wait_in_the_topic_until_a_channel_exists(tcp: str, topic: str) -> None:
    await publish(tcp, topic, b"early", b"bird")
    consumer = await RawConnection.consumer(tcp, topic, "late", rdy=10)
    assert [m.body for m in await consumer.messages(2)] == [b"early", b"bird"]
    await consumer.close()


async def test_a_shorter_msg_timeout_is_not_held_up_by_a_longer_one_before_it(tcp: str, topic: str) -> None:
    # The channel holds both in flight: the second sent expires first.
    patient = await RawConnection.consumer(tcp, topic, "c", msg_timeout=60_000)
    await publish(tcp, topic, b"kept")
    kept = await patient.message()
    hasty = await RawConnection.consumer(tcp, topic, "c", msg_timeout=1000)
    await publish(tcp, topic, b"dropped")
    dropped = await hasty.message()
    again = await hasty.message(TIMEOUT + QUEUE_SCAN_LATENESS)
    assert (again.id, again.body, again.attempts) == (dropped.id, b"dropped", 2)
    await patient.nothing()
    patient.send(encode_fin(kept.id))
    hasty.send(encode_fin(again.id))
    await patient.close()
    await hasty.close()


async def test_a_vanished_consumer_messages_go_to_the_others(tcp: str, topic: str) -> None:
    vanishing = await RawConnection.consumer(tcp, topic, "c", msg_timeout=1000)
    staying = await RawConnection.consumer(tcp, topic, "c", rdy=0)
    await publish(tcp, topic, b"orphan")
    message = await vanishing.message()
    await vanishing.close()
    staying.send(encode_rdy(1))
    again = await staying.message(TIMEOUT + QUEUE_SCAN_LATENESS)
    assert (again.id, again.body, again.attempts) == (message.id, b"orphan", 2)
    await staying.close()


async def test_a_consumer_that_does_not_read_delays_no_one(tcp: str, topic: str) -> None:
    stuck = await RawConnection.consumer(tcp, topic, "stuck", rdy=2500)  # never reads
    healthy = await RawConnection.consumer(tcp, topic, "healthy", rdy=2500)
    publisher = await RawConnection.open(tcp)
    body = b"x" * 100_000
    for _ in range(4):
        publisher.send(encode_mpub(topic, [body] * 40))  # 16 MB for the stuck client
    for _ in range(4):
        assert await publisher.frame() == ResponseFrame(OK)
    assert len(await healthy.messages(160)) == 160
    for connection in (stuck, healthy, publisher):
        await connection.close()


async def publish_16_mb(address: str, topic: str) -> None:
    """More than the socket buffers between the broker and a client can hold."""
    publisher = await RawConnection.open(address)
    body = b"x" * 100_000
    for _ in range(4):
        publisher.send(encode_mpub(topic, [body] * 40))
    for _ in range(4):
        assert await publisher.frame() == ResponseFrame(OK)
    await publisher.close()


async def test_a_consumer_that_does_not_read_takes_no_more_of_its_channel(
    almanet_broker: BrokerAddresses, tcp: str, topic: str
) -> None:
    stuck = await RawConnection.consumer(tcp, topic, "c", rdy=2500)  # never reads
    await publish_16_mb(tcp, topic)
    healthy = await RawConnection.consumer(tcp, topic, "c", rdy=2500)
    await wait_until(
        lambda: (
            sorted(client["ready_count"] for client in (channel_stats(almanet_broker, topic) or {})["c"]["clients"])
            == [2500, 2500]
        )
    )
    small = {b"%d" % n for n in range(50)}
    await publish(tcp, topic, *small)
    received: set[bytes] = set()
    while not small <= received:  # after what the stuck one could not take of the 16 MB (nsqd)
        received.add((await healthy.message()).body)
    await stuck.close()
    await healthy.close()


async def test_a_consumer_that_neither_reads_nor_writes_is_closed(
    almanet_broker: BrokerAddresses, tcp: str, topic: str
) -> None:
    silent = await RawConnection.consumer(tcp, topic, "c", rdy=2500, heartbeat_interval=1000)
    await publish_16_mb(tcp, topic)
    # nsqd gives it up once its read deadline (two heartbeat intervals) or write deadline (one) passes.
    await wait_until(lambda: (channel_stats(almanet_broker, topic) or {})["c"]["client_count"] == 0)
    await silent.close()


async def test_ephemeral_channel_and_topic_go_with_their_last_consumer(
    almanet_broker: BrokerAddresses, tcp: str, topic: str
) -> None:
    ephemeral_topic = topic + "#ephemeral"
    consumers = [await RawConnection.consumer(tcp, ephemeral_topic, "c#ephemeral") for _ in range(2)]
    durable = await RawConnection.consumer(tcp, topic, "c#ephemeral")
    await publish(tcp, topic, b"x")
    await durable.message()
    assert set(channel_stats(almanet_broker, topic) or {}) == {"c#ephemeral"}
    await durable.close()
    await wait_until(lambda: channel_stats(almanet_broker, topic) == {})
    await consumers[0].close()
    assert set(channel_stats(almanet_broker, ephemeral_topic) or {}) == {"c#ephemeral"}
    await consumers[1].close()
    await wait_until(lambda: channel_stats(almanet_broker, ephemeral_topic) is None)


async def test_nothing_acknowledged_is_lost(almanet_broker: BrokerAddresses, tcp: str, topic: str) -> None:
    """Three publishers and two consumers that roll back every seventh delivery: each message is FINed once."""
    consumers = [await RawConnection.consumer(tcp, topic, "c", rdy=50) for _ in range(2)]
    expected = {b"%d-%d" % (publisher, n) for publisher in range(3) for n in range(1000)}

    async def publish_all(publisher: int) -> None:
        connection = await RawConnection.open(tcp)
        bodies = [b"%d-%d" % (publisher, n) for n in range(1000)]
        for start in range(0, 1000, 100):
            connection.send(encode_mpub(topic, bodies[start : start + 50]))
            connection.send(b"".join(encode_pub(topic, body) for body in bodies[start + 50 : start + 100]))
        for _ in range(10 * 51):
            assert await connection.frame() == ResponseFrame(OK)
        await connection.close()

    finished: set[bytes] = set()
    deliveries = 0

    async def consume(consumer: RawConnection) -> None:
        nonlocal deliveries
        while len(finished) < len(expected):
            try:
                message = await consumer.message(0.2)
            except asyncio.TimeoutError:
                continue
            deliveries += 1
            if deliveries % 7 == 0:
                consumer.send(encode_req(message.id, 0))
            else:
                assert message.body not in finished
                finished.add(message.body)
                consumer.send(encode_fin(message.id))

    await asyncio.wait_for(asyncio.gather(*map(publish_all, range(3)), *map(consume, consumers)), 30)
    assert finished == expected
    await wait_until(lambda: (channel_stats(almanet_broker, topic) or {})["c"]["in_flight_count"] == 0)
    channel = (channel_stats(almanet_broker, topic) or {})["c"]
    assert (channel["depth"], channel["deferred_count"], channel["message_count"]) == (0, 0, 3000)
    for consumer in consumers:
        await consumer.close()
