"""One client connection of the embedded broker: nsqd's TCP protocol V2.

Commands are handled as nsqd handles them (``protocol_v2.go`` and
``client_v2.go`` in nsqd's source), with its error codes and texts. Only
FIN, REQ and TOUCH failures leave the connection open; every other error
frame is followed by closing it. What is sent reaches the client when nsqd's
output buffering would let it (see ``output``). Timed-out in-flight messages
are taken back by the broker's queue scan (see ``queuescan``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from almanet._speedups.frames import (
    Command,
    CommandParser,
    encode_error,
    encode_message,
    encode_response,
    is_valid_name,
    parse_base10,
    split_mpub,
)
from almanet.broker.output import ClientOutput
from almanet.broker.topics import Channel, Message, QueueFull, Topic
from almanet.wire.errors import CommandError, ProtocolError, go_quote, wire_text
from almanet.wire.protocol import CLOSE_WAIT, HEARTBEAT, MAGIC_V2, MESSAGE_ID_SIZE, OK

if TYPE_CHECKING:
    from almanet.broker.server import Broker

logger = logging.getLogger("almanet.broker")

# nsqd's client states, as /stats reports them.
STATE_INIT = 0
STATE_SUBSCRIBED = 3
STATE_CLOSING = 4

# nsqd's default: half its 60 s client timeout.
DEFAULT_HEARTBEAT_INTERVAL = 30.0
# nsqd's default output buffer size (its defaultBufferSize).
DEFAULT_OUTPUT_BUFFER_SIZE = 16 * 1024

# How many topics a connection remembers it published to.
_PUBLISHED_TOPICS_CACHED = 64

_OK_FRAME = encode_response(OK)
_HEARTBEAT_FRAME = encode_response(HEARTBEAT)
_CLOSE_WAIT_FRAME = encode_response(CLOSE_WAIT)

# IDENTIFY fields nsqd decodes, by JSON type; others are ignored, as Go's JSON
# decoder does (which also matches names case-insensitively).
_IDENTIFY_FIELDS: dict[str, type] = {
    "client_id": str,
    "hostname": str,
    "user_agent": str,
    "feature_negotiation": bool,
    "tls_v1": bool,
    "deflate": bool,
    "snappy": bool,
    "heartbeat_interval": int,
    "output_buffer_size": int,
    "output_buffer_timeout": int,
    "deflate_level": int,
    "msg_timeout": int,
    "sample_rate": int,
}
_INT64_RANGE = range(-(2**63), 2**63)
_INT32_RANGE = range(-(2**31), 2**31)
# What Go's decoder reads as U+FFFD: a \uXXXX escape of half a surrogate pair.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class ClientConnection(asyncio.Protocol):
    """nsqd's side of one client connection."""

    def __init__(self, broker: Broker) -> None:
        options = broker.options
        self._broker = broker
        self._loop = asyncio.get_running_loop()
        self._parser = CommandParser(options.max_msg_size, options.max_body_size, broker.max_req_timeout_ms)
        self._transport: asyncio.Transport | None = None
        self._output = ClientOutput(self._loop, DEFAULT_OUTPUT_BUFFER_SIZE, options.output_buffer_timeout)
        # nsqd makes a client of a connection, with its message pump, heartbeats
        # and read deadline, once the protocol magic has come.
        self._magic_bytes_due = len(MAGIC_V2)
        self._handlers: dict[bytes, Callable[[Command], None]] = {
            b"IDENTIFY": self._identify,
            b"AUTH": self._auth,
            b"SUB": self._sub,
            b"RDY": self._rdy,
            b"FIN": self._fin,
            b"REQ": self._req,
            b"TOUCH": self._touch,
            b"CLS": self._cls,
            b"NOP": self._nop,
            b"PUB": self._pub,
            b"MPUB": self._mpub,
            b"DPUB": self._dpub,
        }
        self.state = STATE_INIT
        self.closed = False
        self.channel: Channel | None = None
        self.in_flight: dict[bytes, Message] = {}  # in order of deadline, but see _capped_deadline
        self.ready_count = 0
        self.writing_paused = False  # the client does not read what we send
        # Negotiated with IDENTIFY; seconds as floats.
        self.client_id = ""
        self.hostname = ""
        self.user_agent = ""
        self.heartbeat_interval = DEFAULT_HEARTBEAT_INTERVAL
        self.msg_timeout = options.msg_timeout
        self.sample_rate = 0
        # For /stats.
        self.remote_address = ""
        self.connect_ts = int(time.time())
        self.message_count = 0
        self.finish_count = 0
        self.requeue_count = 0
        self.pub_counts: dict[str, int] = {}
        self._published_topics: dict[bytes, Topic] = {}  # by wire name: no decode and lookup per PUB
        self._last_read = self._loop.time()
        self._unparsed: list[bytes] = []  # the reads holding what the parser has not made a command of yet
        self._finished = False  # FINs of this read freed RDY slots
        # The earliest deadline a TOUCH capped at max_msg_timeout: from then on,
        # in_flight may be out of deadline order.
        self._capped_deadline = math.inf
        self._heartbeat_timer: asyncio.TimerHandle | None = None
        self._read_deadline_timer: asyncio.TimerHandle | None = None
        self._write_deadline_timer: asyncio.TimerHandle | None = None

    # --- connection -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its API.
        self._transport = cast(asyncio.Transport, transport)
        self._output.attach(self._transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.remote_address = f"{peer[0]}:{peer[1]}"
        self._broker.clients.add(self)

    def data_received(self, data: bytes) -> None:
        if self._magic_bytes_due:
            self._magic_bytes_due = max(0, self._magic_bytes_due - len(data))
            if not self._magic_bytes_due:
                self.connect_ts = int(time.time())
                self._output.restart_ticker(self._broker.options.output_buffer_timeout)
                self._arm_heartbeat()
        parser = self._parser
        parser.feed(data)
        handlers = self._handlers
        command = None
        try:
            for command in parser:
                handlers[command.name](command)
                if self.closed:
                    return
        except CommandError as error:
            self._send(encode_error(error.data))
            self.close()
            return
        except ProtocolError as error:
            logger.debug("closing %s: %s", self.remote_address, error)
            self.close()
            return
        if command is not None:
            # nsqd's read deadline runs from one whole command to the next:
            # a command trickling in byte by byte does not put it off.
            self._last_read = self._loop.time()
        unparsed = parser.buffered
        if unparsed > len(data):
            self._unparsed.append(data)
        elif unparsed:
            self._unparsed = [data]
        elif self._unparsed:
            self._unparsed = []
        if self._finished:
            # The channel refills the RDY slots FINs freed once per read, not once per FIN.
            self._finished = False
            assert self.channel is not None
            self.channel.dispatch()

    def eof_received(self) -> bool:
        self._refuse_cut_short_command()
        self.close()
        return True

    def _refuse_cut_short_command(self) -> None:
        """nsqd's error for a command whose body stops coming (end of stream, read deadline)."""
        unparsed = self._parser.buffered
        if unparsed and not self.closed:
            options = self._broker.options
            error = _cut_short_error(b"".join(self._unparsed)[-unparsed:], options.max_msg_size, options.max_body_size)
            if error is not None:
                self._send(encode_error(error.data))

    def pause_writing(self) -> None:
        # The client does not read what we send. Blocked writing to it, nsqd
        # reads no more of its commands (so unread NOPs do not count against
        # its read deadline), sends it no more messages (see Channel.dispatch),
        # and gives it up when its write deadline passes.
        self.writing_paused = True
        if self._transport is not None:
            self._transport.pause_reading()
        self._arm_write_deadline()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._last_read = self._loop.time()
        if self._transport is not None and not self.closed:
            self._cancel_write_deadline()
            self._transport.resume_reading()
            if self.channel is not None:
                self.channel.dispatch()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._output.discard()
        self._broker.clients.discard(self)
        self._stop_heartbeat()
        self._cancel_write_deadline()
        channel = self.channel
        if channel is not None and not channel.deleted:
            channel.remove_client(self)

    def close(self) -> None:
        """Flush what is pending and close, as nsqd does after a fatal error."""
        if self.closed:
            return
        self.closed = True
        self.ready_count = 0
        self._output.close()
        if self._transport is not None:
            self._transport.close()
            if self._transport.get_write_buffer_size():
                self._arm_write_deadline()  # the client may never read it

    def abort(self) -> None:
        """Close at once, dropping what the client has not read yet."""
        self.closed = True
        self.ready_count = 0
        self._output.discard()
        if self._transport is not None:
            self._transport.abort()

    def _send(self, frame: bytes) -> None:
        self._output.send(frame)

    def _send_error(self, code: str, description: str) -> None:
        """An error frame that leaves the connection open (FIN, REQ and TOUCH failures)."""
        self._send(encode_error(CommandError(code, description).data))

    # --- timers -----------------------------------------------------------

    def _stop_heartbeat(self) -> None:
        for timer in (self._heartbeat_timer, self._read_deadline_timer):
            if timer is not None:
                timer.cancel()
        self._heartbeat_timer = self._read_deadline_timer = None

    def _arm_heartbeat(self) -> None:
        """(Re)start heartbeats and the read deadline at the negotiated interval."""
        self._stop_heartbeat()
        if self.heartbeat_interval > 0:
            self._heartbeat_timer = self._loop.call_later(self.heartbeat_interval, self._heartbeat)
            self._read_deadline_timer = self._loop.call_at(
                self._last_read + 2 * self.heartbeat_interval, self._check_read_deadline
            )

    def _heartbeat(self) -> None:
        self._send(_HEARTBEAT_FRAME)
        self._heartbeat_timer = self._loop.call_later(self.heartbeat_interval, self._heartbeat)

    def _check_read_deadline(self) -> None:
        # nsqd closes a connection that sends nothing for two heartbeat
        # intervals. Commands only note their time; the timer catches up here.
        if self.writing_paused:
            self._last_read = self._loop.time()
        deadline = self._last_read + 2 * self.heartbeat_interval
        if self._loop.time() < deadline:
            self._read_deadline_timer = self._loop.call_at(deadline, self._check_read_deadline)
            return
        self._read_deadline_timer = None
        logger.debug("closing %s: nothing read for two heartbeat intervals", self.remote_address)
        self._refuse_cut_short_command()
        self.close()

    def _arm_write_deadline(self) -> None:
        """nsqd's write deadline: a heartbeat interval for the client to read some of what is pending."""
        if self.heartbeat_interval > 0 and self._write_deadline_timer is None and self._transport is not None:
            self._write_deadline_timer = self._loop.call_later(
                self.heartbeat_interval, self._check_write_deadline, self._transport.get_write_buffer_size()
            )

    def _cancel_write_deadline(self) -> None:
        if self._write_deadline_timer is not None:
            self._write_deadline_timer.cancel()
            self._write_deadline_timer = None

    def _check_write_deadline(self, pending_before: int) -> None:
        self._write_deadline_timer = None
        assert self._transport is not None
        if self._transport.get_write_buffer_size() < pending_before:
            self._arm_write_deadline()  # it reads, if slowly
            return
        logger.debug("closing %s: it read nothing for a heartbeat interval", self.remote_address)
        self.abort()

    def take_timed_out(self, now: float) -> list[Message]:
        """Take the in-flight messages whose msg_timeout passed by ``now`` (the queue scan gives them back)."""
        in_flight = self.in_flight
        if now >= self._capped_deadline:
            expired = [message for message in in_flight.values() if message.deadline <= now]
            max_msg_timeout = self._broker.options.max_msg_timeout
            self._capped_deadline = min(
                (
                    message.deadline
                    for message in in_flight.values()
                    if now < message.deadline == message.delivered_at + max_msg_timeout
                ),
                default=math.inf,
            )
        else:
            expired = []
            for message in in_flight.values():
                if message.deadline > now:
                    break
                expired.append(message)
        for message in expired:
            del in_flight[message.id]
        return expired

    def forget_in_flight(self) -> None:
        """The channel was emptied: its in-flight messages are gone."""
        self.in_flight.clear()
        self._capped_deadline = math.inf

    # --- delivery -----------------------------------------------------------

    def deliver(self, message: Message, channel: Channel, now: float) -> bool:
        """Send ``message`` and hold it in flight until FIN, REQ or msg_timeout; whether RDY allows more."""
        in_flight = self.in_flight
        if self.sample_rate and random.randrange(100) > self.sample_rate:
            return self.ready_count > len(in_flight)  # nsqd drops the messages a sampling client does not take
        message.attempts += 1
        message.delivered_at = now
        message.deadline = now + self.msg_timeout
        in_flight[message.id] = message
        channel.in_flight_count += 1
        self.message_count += 1
        ready_for_more = self.ready_count > len(in_flight)
        # attempts is a uint16 on the wire and wraps there, as in nsqd.
        self._output.send_message(
            encode_message(message.timestamp, message.attempts & 0xFFFF, message.id, message.body), ready_for_more
        )
        return ready_for_more

    # --- commands -----------------------------------------------------------

    def _identify(self, command: Command) -> None:
        if self.state != STATE_INIT:
            raise CommandError("E_INVALID", "cannot IDENTIFY in current state")
        assert command.body is not None
        data = _decode_identify(command.body)
        options = self._broker.options
        output = self._output
        heartbeat_interval = data.get("heartbeat_interval", 0)
        if heartbeat_interval == -1:
            self.heartbeat_interval = 0
        elif heartbeat_interval != 0:
            _check_range("heartbeat interval", heartbeat_interval, 1000, options.max_heartbeat_interval * 1000)
            self.heartbeat_interval = heartbeat_interval / 1000
        flush_interval = output.flush_interval
        buffer_timeout = data.get("output_buffer_timeout", 0)
        if buffer_timeout == -1:
            flush_interval = 0
        elif buffer_timeout != 0:
            _check_range(
                "output buffer timeout",
                buffer_timeout,
                options.min_output_buffer_timeout * 1000,
                options.max_output_buffer_timeout * 1000,
            )
            flush_interval = buffer_timeout / 1000
        buffer_size = data.get("output_buffer_size", 0)
        if buffer_size == -1:
            # Every write goes straight to the socket.
            buffer_size = 1
            flush_interval = 0
        elif buffer_size != 0:
            _check_range("output buffer size", buffer_size, 64, options.max_output_buffer_size)
        sample_rate = data.get("sample_rate", 0)
        _check_range("sample rate", sample_rate, 0, 99)
        msg_timeout = data.get("msg_timeout", 0)
        if msg_timeout != 0:
            _check_range("msg timeout", msg_timeout, 1000, options.max_msg_timeout * 1000)
            self.msg_timeout = msg_timeout / 1000
        self.sample_rate = sample_rate
        self.client_id = data.get("client_id", "")
        self.hostname = data.get("hostname", "")
        self.user_agent = data.get("user_agent", "")
        if buffer_size:
            output.size = buffer_size
        output.restart_ticker(flush_interval)
        self._arm_heartbeat()
        if not data.get("feature_negotiation", False):
            self._send(_OK_FRAME)
            return
        # Go's encoding/json field order; TLS and compression are not offered.
        response = {
            "max_rdy_count": options.max_rdy_count,
            "version": self._broker.version,
            "max_msg_timeout": int(options.max_msg_timeout * 1000),
            "msg_timeout": int(self.msg_timeout * 1000),
            "tls_v1": False,
            "deflate": False,
            "deflate_level": min(6, options.max_deflate_level),
            "max_deflate_level": options.max_deflate_level,
            "snappy": False,
            "sample_rate": self.sample_rate,
            "auth_required": False,
            "output_buffer_size": output.size,
            "output_buffer_timeout": round(output.flush_interval * 1000),
        }
        self._send(encode_response(json.dumps(response, separators=(",", ":")).encode()))

    def _auth(self, command: Command) -> None:
        if self.state != STATE_INIT:
            raise CommandError("E_INVALID", "cannot AUTH in current state")
        raise CommandError("E_AUTH_DISABLED", "AUTH disabled")

    def _sub(self, command: Command) -> None:
        if self.state != STATE_INIT:
            raise CommandError("E_INVALID", "cannot SUB in current state")
        if self.heartbeat_interval <= 0:
            raise CommandError("E_INVALID", "cannot SUB with heartbeats disabled")
        params = command.params
        if len(params) < 2:
            raise CommandError("E_INVALID", "SUB insufficient number of parameters")
        if not is_valid_name(params[0]):
            raise CommandError("E_BAD_TOPIC", f"SUB topic name {go_quote(params[0])} is not valid")
        if not is_valid_name(params[1]):
            raise CommandError("E_BAD_CHANNEL", f"SUB channel name {go_quote(params[1])} is not valid")
        channel = self._broker.get_topic(params[0].decode()).get_channel(params[1].decode())
        channel.add_client(self)
        self.channel = channel
        self.state = STATE_SUBSCRIBED
        self._send(_OK_FRAME)

    def _rdy(self, command: Command) -> None:
        if self.state == STATE_CLOSING:
            return  # nsqd ignores RDY once CLS was sent
        if self.state != STATE_SUBSCRIBED:
            raise CommandError("E_INVALID", "cannot RDY in current state")
        count = 1
        if command.params:
            parsed = parse_base10(command.params[0])
            if parsed is None:
                raise CommandError("E_INVALID", f"RDY could not parse count {wire_text(command.params[0])}")
            count = parsed
        max_rdy_count = self._broker.options.max_rdy_count
        if count > max_rdy_count:
            raise CommandError("E_INVALID", f"RDY count {count} out of range 0-{max_rdy_count}")
        self.ready_count = count
        if count <= len(self.in_flight):
            self._output.flush()  # nsqd's pump flushes a client ready for no more messages
        assert self.channel is not None
        self.channel.dispatch()

    def _in_flight_command(self, command: Command, label: str, count: int) -> tuple[Channel, bytes]:
        """The checks FIN, REQ and TOUCH share: state, parameter count, message id."""
        if self.state != STATE_SUBSCRIBED and self.state != STATE_CLOSING:
            raise CommandError("E_INVALID", f"cannot {label} in current state")
        if len(command.params) < count:
            raise CommandError("E_INVALID", f"{label} insufficient number of params")
        message_id = command.params[0]
        if len(message_id) != MESSAGE_ID_SIZE:
            raise CommandError("E_INVALID", "invalid message ID")
        assert self.channel is not None
        return self.channel, message_id

    def _not_in_flight(self, channel: Channel, code: str, label: str, message_id: bytes) -> None:
        owner = channel.owner_of(message_id)
        reason = "ID not in flight" if owner is None else "client does not own message"
        self._send_error(code, f"{label} {wire_text(message_id)} failed {reason}")

    def _fin(self, command: Command) -> None:
        channel, message_id = self._in_flight_command(command, "FIN", 1)
        if self.in_flight.pop(message_id, None) is None:
            self._not_in_flight(channel, "E_FIN_FAILED", "FIN", message_id)
            return
        channel.in_flight_count -= 1
        self.finish_count += 1
        self._finished = True

    def _req(self, command: Command) -> None:
        channel, message_id = self._in_flight_command(command, "REQ", 2)
        timeout_ms = parse_base10(command.params[1])
        if timeout_ms is None:
            raise CommandError("E_INVALID", f"REQ could not parse timeout {wire_text(command.params[1])}")
        # nsqd clamps an out-of-range timeout instead of refusing it.
        timeout_ms = min(timeout_ms, self._broker.max_req_timeout_ms)
        message = self.in_flight.pop(message_id, None)
        if message is None:
            self._not_in_flight(channel, "E_REQ_FAILED", "REQ", message_id)
            return
        self.requeue_count += 1
        channel.requeue(message, timeout_ms / 1000)

    def _touch(self, command: Command) -> None:
        channel, message_id = self._in_flight_command(command, "TOUCH", 1)
        message = self.in_flight.pop(message_id, None)
        if message is None:
            self._not_in_flight(channel, "E_TOUCH_FAILED", "TOUCH", message_id)
            return
        deadline = self._loop.time() + self.msg_timeout
        latest = message.delivered_at + self._broker.options.max_msg_timeout
        if deadline >= latest:
            # Capped by max_msg_timeout, it may now expire before messages ahead of it in in_flight.
            deadline = latest
            self._capped_deadline = min(self._capped_deadline, latest)
        message.deadline = deadline
        self.in_flight[message_id] = message  # to the end: in_flight stays in deadline order

    def _cls(self, command: Command) -> None:
        if self.state != STATE_SUBSCRIBED:
            raise CommandError("E_INVALID", "cannot CLS in current state")
        self.ready_count = 0
        self.state = STATE_CLOSING
        self._output.flush()
        self._send(_CLOSE_WAIT_FRAME)

    def _nop(self, command: Command) -> None:
        pass

    def _publish(self, label: str, topic_name: bytes, bodies: list[bytes], delay: float = 0.0) -> None:
        topic = self._published_topics.get(topic_name)
        if topic is None or topic.deleted:
            if len(self._published_topics) >= _PUBLISHED_TOPICS_CACHED:
                self._published_topics.clear()
            topic = self._published_topics[topic_name] = self._broker.get_topic(topic_name.decode())
        try:
            topic.publish(bodies, time.time_ns(), delay)
        except QueueFull as error:
            raise CommandError(f"E_{label}_FAILED", f"{label} failed {error}") from None
        pub_counts = self.pub_counts
        pub_counts[topic.name] = pub_counts.get(topic.name, 0) + len(bodies)
        self._send(_OK_FRAME)

    def _pub(self, command: Command) -> None:
        assert command.body is not None
        self._publish("PUB", command.params[0], [command.body])

    def _mpub(self, command: Command) -> None:
        assert command.messages is not None
        self._publish("MPUB", command.params[0], command.messages)

    def _dpub(self, command: Command) -> None:
        assert command.body is not None
        defer_ms = parse_base10(command.params[1])
        assert defer_ms is not None  # checked by the parser
        self._publish("DPUB", command.params[0], [command.body], defer_ms / 1000)


def _decode_identify(body: bytes) -> dict[str, Any]:
    """IDENTIFY's JSON as nsqd's Go decoder reads it into its struct."""
    try:
        decoded = json.loads(body.decode("utf-8", "replace"), parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # Go's decoder refuses deep nesting too
        raise _bad_identify_json() from None
    if decoded is None:
        return {}
    if not isinstance(decoded, dict):
        raise _bad_identify_json()
    fields: dict[str, Any] = {}
    for key, value in decoded.items():
        field = key.lower()
        kind = _IDENTIFY_FIELDS.get(field)
        if kind is None or value is None:
            continue
        if type(value) is not kind or (
            kind is int and value not in (_INT32_RANGE if field == "sample_rate" else _INT64_RANGE)
        ):
            raise _bad_identify_json()
        fields[field] = _LONE_SURROGATE.sub("\ufffd", value) if isinstance(value, str) else value
    return fields


# What nsqd says when a body command's size or body stops coming, by command.
_CUT_SHORT_SIZE = {
    b"IDENTIFY": ("E_BAD_BODY", "IDENTIFY failed to read body size"),
    b"AUTH": ("E_BAD_BODY", "AUTH failed to read body size"),
    b"PUB": ("E_BAD_MESSAGE", "PUB failed to read message body size"),
    b"DPUB": ("E_BAD_MESSAGE", "DPUB failed to read message body size"),
    b"MPUB": ("E_BAD_BODY", "MPUB failed to read body size"),
}
_CUT_SHORT_BODY = {
    b"IDENTIFY": ("E_BAD_BODY", "IDENTIFY failed to read body"),
    b"AUTH": ("E_BAD_BODY", "AUTH failed to read body"),
    b"PUB": ("E_BAD_MESSAGE", "PUB failed to read message body"),
    b"DPUB": ("E_BAD_MESSAGE", "DPUB failed to read message body"),
}


def _cut_short_error(pending: bytes, max_msg_size: int, max_body_size: int) -> CommandError | None:
    """nsqd's error for the command ``pending`` begins, cut short; None while its line is incomplete.

    The parser has checked whatever of it came before the cut.
    """
    line_end = pending.find(b"\n")
    if line_end < 0:
        return None  # nsqd closes without a word
    name = pending[:line_end].split(b" ", 1)[0].removesuffix(b"\r")
    size_at = line_end + 1
    if len(pending) - size_at < 4:
        return CommandError(*_CUT_SHORT_SIZE[name])
    if name != b"MPUB":
        return CommandError(*_CUT_SHORT_BODY[name])
    # nsqd reads MPUB's messages one by one: the error is about the first one cut short.
    try:
        split_mpub(pending, size_at + 4, len(pending), max_msg_size, max_body_size)
    except CommandError as error:
        return error
    return None


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _bad_identify_json() -> CommandError:
    return CommandError("E_BAD_BODY", "IDENTIFY failed to decode JSON body")


def _check_range(what: str, value: int, low: float, high: float) -> None:
    if not low <= value <= high:
        raise CommandError("E_BAD_BODY", f"IDENTIFY {what} ({value}) is invalid")
