"""almanet's NSQ client against a fake nsqd (tests/fakensqd.py), for what a real one won't do.

Garbage, frames cut short, silence, AUTH, stray frames, refused handshakes
and dropped connections come from the fake, and the exact commands the
client sends are checked there; what a real broker does is in test_client.py.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time

import pytest
from fakensqd import TIMEOUT, FakeClient, FakeLookupd, FakeNsqd

from almanet._speedups.frames import encode_error, encode_message, encode_pub, encode_response
from almanet.loops import within
from almanet.nsq import (
    CommandError,
    Connection,
    ConnectionOptions,
    Consumer,
    FrameError,
    Message,
    Producer,
    ProtocolError,
)
from almanet.wire.protocol import CLOSE_WAIT, HEARTBEAT, OK
from helpers import eventually

pytestmark = pytest.mark.asyncio

TOPIC = "faults"
MESSAGE_ID = b"0123456789abcdef"


def message_frame() -> bytes:
    return encode_message(time.time_ns(), 1, MESSAGE_ID, b"work")


# --- bytes that break the protocol ----------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        b"HTTP/1.1 400 Bad Request\r\n\r\n",  # a frame size far above the limit
        struct.pack(">i", 2) + b"ab",  # a size too small for the frame type
        struct.pack(">ii", 8, 7) + b"data",  # an unknown frame type
        struct.pack(">ii", 10, 2) + b"123456",  # a message frame shorter than its header
    ],
    ids=["not-nsq", "size-below-4", "unknown-type", "short-message"],
)
async def test_garbage_fails_the_publishes_in_flight_and_the_next_publish_reconnects(
    garbage: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    async def serve(client: FakeClient) -> None:
        await client.handshake()
        if client.number == 0:
            await client.expect(b"MPUB")  # the three publishes, coalesced
            client.send(garbage)
            await client.closed()
        else:
            await client.answer_publishes()

    async with FakeNsqd(serve) as nsqd, Producer(nsqd.address) as producer:
        results = await asyncio.wait_for(
            asyncio.gather(*(producer.publish(TOPIC, b"%d" % n) for n in range(3)), return_exceptions=True), TIMEOUT
        )
        for result in results:
            assert isinstance(result, ConnectionError), result
            assert isinstance(result.__cause__, FrameError)
        assert "closing the connection" in caplog.text
        assert await producer.publish(TOPIC, b"after") == OK
    assert len(nsqd.clients) == 2


@pytest.mark.parametrize(
    "partial", [b"", b"\x00\x00\x00\x06\x00\x00", b"\x00\x00\x00\x06\x00\x00\x00\x00O"], ids=["none", "size", "body"]
)
async def test_a_connection_closed_before_the_answer_fails_the_publish(partial: bytes) -> None:
    async def serve(client: FakeClient) -> None:
        await client.handshake()
        await client.expect(b"PUB")
        client.send(partial)

    async with FakeNsqd(serve) as nsqd, Producer(nsqd.address) as producer:
        with pytest.raises(ConnectionError, match="lost") as lost:
            await asyncio.wait_for(producer.publish(TOPIC, b"body"), TIMEOUT)
    if partial:  # cut off in the middle of a frame
        assert isinstance(lost.value.__cause__, FrameError)


@pytest.mark.parametrize("answer", [b"not json", b"[1, 2]"])
async def test_an_identify_answer_that_is_not_json_is_a_connection_error(answer: bytes) -> None:
    async def serve(client: FakeClient) -> None:
        await client.expect(b"IDENTIFY")
        client.send(encode_response(answer))
        await client.closed()

    async with FakeNsqd(serve) as nsqd:
        with pytest.raises(ConnectionError, match="IDENTIFY") as refused:
            await Connection.open(nsqd.address, ConnectionOptions())
    assert isinstance(refused.value.__cause__, ProtocolError)


async def test_a_refused_identify_is_a_command_error() -> None:
    async def serve(client: FakeClient) -> None:
        await client.expect(b"IDENTIFY")
        client.send(encode_error(b"E_BAD_BODY IDENTIFY heartbeat interval (100) is invalid"))

    async with FakeNsqd(serve) as nsqd:
        with pytest.raises(CommandError) as refused:
            await Connection.open(nsqd.address, ConnectionOptions(heartbeat_interval=0.1))
    assert refused.value.code == "E_BAD_BODY"


async def test_an_unanswered_identify_times_out() -> None:
    async def serve(client: FakeClient) -> None:
        await client.expect(b"IDENTIFY")
        await client.closed()

    async with FakeNsqd(serve) as nsqd:
        started = time.monotonic()
        with pytest.raises(ConnectionError, match="IDENTIFY in time"):
            await Connection.open(nsqd.address, ConnectionOptions(connect_timeout=0.2))
        assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(
    ("frame", "closes", "logged"),
    [
        (encode_response(OK), True, "with no command waiting"),
        (message_frame(), True, "did not subscribe"),
        (encode_error(b"E_INVALID cannot do that"), True, "E_INVALID cannot do that"),
        (encode_error(b"E_FIN_FAILED FIN 0123456789abcdef failed ID not in flight"), False, "E_FIN_FAILED"),
    ],
    ids=["stray-answer", "stray-message", "fatal-error", "non-fatal-error"],
)
async def test_stray_frames(frame: bytes, closes: bool, logged: str, caplog: pytest.LogCaptureFixture) -> None:
    """A frame no command asked for breaks the protocol, but for the errors nsqd sends on an open connection."""

    async def serve(client: FakeClient) -> None:
        await client.handshake()
        client.send(frame)
        await client.answer_publishes()

    async with FakeNsqd(serve) as nsqd:
        connection = await Connection.open(nsqd.address, ConnectionOptions())
        await eventually(lambda: logged in caplog.text)
        if closes:
            await asyncio.wait_for(connection.wait_closed(), TIMEOUT)
        else:
            assert await asyncio.wait_for(connection.request(encode_pub(TOPIC, b"x")), TIMEOUT) == OK
        await connection.close()


# --- heartbeats -----------------------------------------------------------------------


async def test_heartbeats_are_answered_with_nop() -> None:
    """A heartbeat every half interval: the client answers each and stays up past two intervals."""
    nops = []

    async def serve(client: FakeClient) -> None:
        await client.handshake()
        for _ in range(5):
            await asyncio.sleep(0.1)
            client.send(encode_response(HEARTBEAT))
            nops.append(await client.expect(b"NOP"))
        await client.closed()

    async with FakeNsqd(serve) as nsqd:
        connection = await Connection.open(nsqd.address, ConnectionOptions(heartbeat_interval=0.2))
        await eventually(lambda: len(nops) == 5)
        assert connection.is_open
        await connection.close()


async def test_silence_closes_the_connection_after_two_heartbeat_intervals(caplog: pytest.LogCaptureFixture) -> None:
    """A peer that stops sending heartbeats is gone: the publish waiting for it fails, it does not hang."""

    async def serve(client: FakeClient) -> None:
        await client.handshake()
        await client.closed()

    async with FakeNsqd(serve) as nsqd:
        started = time.monotonic()
        async with Producer(nsqd.address, options=ConnectionOptions(heartbeat_interval=0.2)) as producer:
            with pytest.raises(ConnectionError, match="no heartbeat"):
                await asyncio.wait_for(producer.publish(TOPIC, b"into the void"), TIMEOUT)
            elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 2.0  # two intervals, and slack for a loaded machine
    assert "no heartbeat" in caplog.text


# --- AUTH -----------------------------------------------------------------------------

SECRET = b"s3cret"
AUTH_ANSWER = {"identity": "tester", "identity_url": "", "permission_count": 1}


async def test_auth_required_sends_the_configured_secret() -> None:
    async def serve(client: FakeClient) -> None:
        await client.handshake(auth_required=True)
        auth = await client.expect(b"AUTH")
        assert auth.body == SECRET
        client.send(encode_response(json.dumps(AUTH_ANSWER).encode()))
        await client.answer_publishes()

    async with FakeNsqd(serve) as nsqd, Producer(nsqd.address, options=ConnectionOptions(auth_secret=SECRET)) as p:
        assert await p.publish(TOPIC, b"authorized") == OK
        assert (await p.connect()).negotiated["auth"] == AUTH_ANSWER


async def test_auth_required_without_a_secret_is_a_connection_error() -> None:
    async def serve(client: FakeClient) -> None:
        await client.handshake(auth_required=True)
        await client.closed()
        assert [command.name for command in client.commands] == [b"IDENTIFY"]  # no AUTH, no PUB

    async with FakeNsqd(serve) as nsqd:
        with pytest.raises(ConnectionError, match="requires AUTH"):
            await Producer(nsqd.address).publish(TOPIC, b"unauthorized")


async def test_auth_refused_is_a_command_error() -> None:
    async def serve(client: FakeClient) -> None:
        await client.handshake(auth_required=True)
        await client.expect(b"AUTH")
        client.send(encode_error(b"E_AUTH_FAILED AUTH failed"))

    async with FakeNsqd(serve) as nsqd:
        with pytest.raises(CommandError) as refused:
            await Connection.open(nsqd.address, ConnectionOptions(auth_secret=b"wrong"))
    assert refused.value.code == "E_AUTH_FAILED"


# --- consumers ------------------------------------------------------------------------


class Inbox:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[Message] = asyncio.Queue()

    def __call__(self, message: Message) -> None:
        self.queue.put_nowait(message)

    async def next(self) -> Message:
        return await asyncio.wait_for(self.queue.get(), TIMEOUT)


async def serve_one_message(client: FakeClient) -> None:
    """A subscription that gets one message, and its FIN."""
    await client.subscribe()
    await client.expect(b"RDY", b"1")
    client.send(message_frame())
    await client.expect(b"FIN", MESSAGE_ID)
    await client.closed()


async def test_a_dropped_consumer_reconnects_with_growing_delays_then_resumes() -> None:
    failures = 4
    delays = [0.1, 0.2, 0.4, 0.4, 0.4]  # doubling from 0.1 s, capped by max_reconnect_interval

    async def serve(client: FakeClient) -> None:
        if client.number == 0:
            await client.subscribe()
            await client.expect(b"RDY")  # subscribed; now dropped
        elif client.number > failures:
            await serve_one_message(client)
        # In between: closed at once.

    inbox = Inbox()
    async with (
        FakeNsqd(serve) as nsqd,
        Consumer(
            TOPIC, "ch", inbox, nsqd_tcp_addresses=[nsqd.address], options=ConnectionOptions(max_reconnect_interval=0.4)
        ) as consumer,
    ):
        (await inbox.next()).fin()  # the fake checks the FIN
        assert list(consumer.connections) == [nsqd.address]
    gaps = [later - earlier for earlier, later in zip(nsqd.accepted, nsqd.accepted[1:], strict=False)]
    assert len(gaps) == len(delays)
    for gap, delay in zip(gaps, delays, strict=True):
        # Jitter of ±25 %, and slack for a loaded machine; the last delay
        # uncapped (1.6 s) would still fail.
        assert 0.75 * delay - 0.01 <= gap <= 1.25 * delay + 0.25, (gaps, delays)


async def test_a_consumer_keeps_reconnecting_when_the_handshake_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    async def serve(client: FakeClient) -> None:
        if client.number == 0:
            await client.subscribe()
            await client.expect(b"RDY")  # subscribed; now dropped
        elif client.number == 1:
            await client.expect(b"IDENTIFY")
            client.send(encode_error(b"E_BAD_BODY IDENTIFY failed to decode JSON body"))
        else:
            await serve_one_message(client)

    inbox = Inbox()
    async with (
        FakeNsqd(serve) as nsqd,
        Consumer(TOPIC, "ch", inbox, nsqd_tcp_addresses=[nsqd.address]),
    ):
        (await inbox.next()).fin()
    assert len(nsqd.clients) == 3
    assert "E_BAD_BODY" in caplog.text


async def test_stop_sends_rdy_0_waits_for_the_answer_then_cls() -> None:
    async def serve(client: FakeClient) -> None:
        await client.subscribe()
        await client.expect(b"RDY", b"1")
        client.send(message_frame())
        await client.expect(b"RDY", b"0")
        await client.expect(b"FIN", MESSAGE_ID)
        await client.expect(b"CLS")
        client.send(encode_response(CLOSE_WAIT))
        await client.closed()

    inbox = Inbox()
    async with FakeNsqd(serve) as nsqd:
        consumer = Consumer(TOPIC, "ch", inbox, nsqd_tcp_addresses=[nsqd.address])
        await consumer.start()
        message = await inbox.next()
        stopping = asyncio.ensure_future(consumer.stop(timeout=TIMEOUT))
        await eventually(lambda: len(nsqd.clients[0].commands) == 4)  # the RDY 0
        assert not stopping.done()
        message.fin()
        await asyncio.wait_for(stopping, TIMEOUT)
        assert not consumer.connections


async def test_backoff_sends_rdy_0_before_the_req() -> None:
    """Else nsqd may hand the requeued message straight back to the connection backing off."""

    async def serve(client: FakeClient) -> None:
        await client.subscribe()
        await client.expect(b"RDY", b"5")
        client.send(message_frame())
        await client.expect(b"RDY", b"0")
        await client.expect(b"REQ", MESSAGE_ID, b"0")
        await client.closed()  # CLS answered

    inbox = Inbox()
    async with (
        FakeNsqd(serve) as nsqd,
        Consumer(TOPIC, "ch", inbox, nsqd_tcp_addresses=[nsqd.address], max_in_flight=5, backoff=True),
    ):
        (await inbox.next()).req(0, backoff=True)


async def test_stop_closes_an_nsqd_found_through_nsqlookupd_whose_cls_is_unanswered() -> None:
    async def serve(client: FakeClient) -> None:
        await client.subscribe()
        await client.closed(answer_cls=False)

    async with FakeNsqd(serve) as nsqd, FakeLookupd() as lookupd:
        lookupd.producers = [nsqd.address]
        consumer = Consumer(
            TOPIC, "ch", Inbox(), lookupd_http_addresses=[lookupd.http_address], lookupd_poll_interval=0.05
        )
        await consumer.start()
        await eventually(lambda: nsqd.address in consumer.connections)
        await asyncio.wait_for(consumer.stop(timeout=0.5), TIMEOUT)
        assert [command.name for command in nsqd.clients[0].commands][-1:] == [b"CLS"]
        await eventually(lambda: nsqd.served == 1)  # the connection closed


async def test_closing_a_producer_while_it_connects_sends_what_was_published_then_closes() -> None:
    async def serve(client: FakeClient) -> None:
        await client.handshake()
        await client.answer_publishes()

    async with FakeNsqd(serve) as nsqd:
        producer = Producer(nsqd.address)
        publishing = producer.publish(TOPIC, b"published before close")
        await asyncio.sleep(0)  # connecting
        await asyncio.wait_for(producer.close(), TIMEOUT)
        assert publishing.result() == OK
        with pytest.raises(ConnectionError, match="closed"):
            producer.publish(TOPIC, b"too late")
        await eventually(lambda: nsqd.served == len(nsqd.clients) == 1)


@pytest.mark.parametrize("then_close", [False, True], ids=["then-wait", "then-eof"])
async def test_a_big_read_is_handled_over_several_loop_iterations_in_order(then_close: bool) -> None:
    """300 messages in one write: 64 a loop iteration, in order; an EOF right after them waits for the rest."""
    ids = [b"%016d" % number for number in range(300)]

    async def serve(client: FakeClient) -> None:
        await client.subscribe()
        if client.number == 0:
            await client.expect(b"RDY", b"300")
            client.send(b"".join(encode_message(time.time_ns(), 1, message_id, b"work") for message_id in ids))
            if then_close:
                return
        await client.closed()  # the consumer reconnects after the EOF

    iterations = 0
    delivered: list[tuple[int, bytes]] = []  # (loop iteration, message id)

    async def count_iterations() -> None:
        nonlocal iterations
        while True:
            await asyncio.sleep(0)
            iterations += 1

    def on_message(message: Message) -> None:
        delivered.append((iterations, message.id))
        message.fin()

    counting = asyncio.ensure_future(count_iterations())
    try:
        async with (
            FakeNsqd(serve) as nsqd,
            Consumer(TOPIC, "ch", on_message, nsqd_tcp_addresses=[nsqd.address], max_in_flight=300),
        ):
            await eventually(lambda: len(delivered) == len(ids))
    finally:
        counting.cancel()
    assert [message_id for _, message_id in delivered] == ids
    if not then_close:  # (the EOF hands over all that is left at once)
        assert len({iteration for iteration, _ in delivered}) >= len(ids) // 64


# --- publishing while connecting, closing, failing over -----------------------------------


async def test_a_batch_too_big_is_refused_at_once_even_before_connecting() -> None:
    producer = Producer("127.0.0.1:1", options=ConnectionOptions(max_body_size=100))
    with pytest.raises(ValueError, match="max_body_size"):
        producer.publish_batch(TOPIC, [b"x" * 40, b"y" * 40, b"z" * 40])
    await producer.close(timeout=1)


async def test_closing_while_nsqd_does_not_answer_identify_fails_what_was_published() -> None:
    async def serve(client: FakeClient) -> None:
        await client.closed(answer_cls=False)  # reads IDENTIFY, answers nothing

    async with FakeNsqd(serve) as nsqd:
        producer = Producer(nsqd.address, options=ConnectionOptions(connect_timeout=0.5))
        published = producer.publish(TOPIC, b"never sent")
        await asyncio.wait_for(producer.close(timeout=0.1), TIMEOUT)
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(published, TIMEOUT)  # once the connection attempt ends, not never


async def test_a_refused_identify_fails_over_to_the_next_nsqd() -> None:
    async def refuse(client: FakeClient) -> None:
        await client.expect(b"IDENTIFY")
        client.send(encode_error(b"E_BAD_BODY IDENTIFY refused"))

    async def serve(client: FakeClient) -> None:
        await client.handshake()
        await client.answer_publishes()

    async with (
        FakeNsqd(refuse) as refusing,
        FakeNsqd(serve) as working,
        Producer(refusing.address, working.address) as producer,
    ):
        assert await asyncio.wait_for(producer.publish(TOPIC, b"body"), TIMEOUT) == OK
        assert (await producer.connect()).address == working.address


async def test_answers_put_off_are_handled_before_a_close() -> None:
    """200 OKs in one read; the first one's waiter closes the connection: the other 199 are still answers."""

    async def serve(client: FakeClient) -> None:
        await client.handshake()
        for _ in range(200):
            await client.expect(b"PUB")
        client.send(encode_response(OK) * 200)
        await client.closed()

    async with FakeNsqd(serve) as nsqd:
        connection = await Connection.open(nsqd.address, ConnectionOptions())
        answers = [connection.request(encode_pub(TOPIC, b"%d" % number)) for number in range(200)]
        answers[0].add_done_callback(lambda _: connection.close_soon())
        results = await asyncio.wait_for(asyncio.gather(*answers, return_exceptions=True), TIMEOUT)
        await connection.wait_closed()
    assert results == [OK] * 200


async def test_no_message_is_handed_out_after_its_handler_closed_the_connection() -> None:
    async def serve(client: FakeClient) -> None:
        if client.number == 0:
            await client.subscribe()
            await client.expect(b"RDY")
            client.send(message_frame() * 10)
        await client.closed()  # (the consumer reconnects: not answered)

    handled: list[Message] = []

    def on_message(message: Message) -> None:
        handled.append(message)
        (connection,) = consumer.connections.values()
        connection.close_soon()

    async with FakeNsqd(serve) as nsqd:
        consumer = Consumer(TOPIC, "ch", on_message, nsqd_tcp_addresses=[nsqd.address], max_in_flight=10)
        await consumer.start()
        await eventually(lambda: handled)
        await asyncio.sleep(0.1)
        await consumer.stop(timeout=1)
    assert len(handled) == 1


async def test_a_connection_being_opened_keeps_a_cancellation_that_comes_as_a_step_finishes() -> None:
    """asyncio.wait_for before 3.12 returns the result then and drops the cancellation: a stopped consumer's
    reconnection went on to handshake with an nsqd that never answered (this test file failed now and then)."""
    loop = asyncio.get_running_loop()
    step = loop.create_future()
    opening = asyncio.ensure_future(within(step, TIMEOUT))
    await asyncio.sleep(0)
    step.set_result("connected")
    opening.cancel()
    with pytest.raises(asyncio.CancelledError):
        await opening


async def test_stop_answers_messages_nsqd_sent_before_it_had_rdy_0_before_closing() -> None:
    """A message between RDY 0 and CLOSE_WAIT is in flight too: its FIN goes out before the connection closes."""

    async def serve(client: FakeClient) -> None:
        await client.subscribe()
        await client.expect(b"RDY", b"1")
        await client.expect(b"RDY", b"0")
        await client.expect(b"CLS")
        client.send(message_frame() + encode_response(CLOSE_WAIT))  # sent before nsqd read the RDY 0
        await client.expect(b"FIN", MESSAGE_ID)
        await client.closed()

    loop = asyncio.get_running_loop()
    async with FakeNsqd(serve) as nsqd:
        consumer = Consumer(
            TOPIC, "ch", lambda message: loop.call_later(0.1, message.fin), nsqd_tcp_addresses=[nsqd.address]
        )
        await consumer.start()
        await eventually(lambda: nsqd.clients and [c.name for c in nsqd.clients[0].commands][-1:] == [b"RDY"])
        await asyncio.wait_for(consumer.stop(timeout=5), TIMEOUT)
        await eventually(lambda: nsqd.served == 1)  # the fake saw the FIN, then the close
