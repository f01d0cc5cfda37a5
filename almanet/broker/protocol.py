"""nsqd's TCP protocol V2 (its ``protocol_v2.go``): the command handlers and the message pump.

Commands are handled as nsqd handles them, with its error codes and texts.
Only FIN, REQ and TOUCH failures leave the connection open; every other
error frame is followed by closing it. The messages a client is sent are in
flight in their channel (see ``topics.Channel``) until it FINs or REQs them
or their msg_timeout passes; the connection itself, its deadlines and what
IDENTIFY negotiated are ``client.Client``'s.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Callable
from typing import Any, Protocol

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
from almanet.broker.client import STATE_CLOSING, STATE_INIT, STATE_SUBSCRIBED, Client
from almanet.broker.options import BrokerOptions
from almanet.broker.topics import Channel, Message, NotInFlight, QueueFull, Topic
from almanet.wire.errors import CommandError, ProtocolError, go_quote, wire_text
from almanet.wire.protocol import CLOSE_WAIT, MAGIC_V2, MESSAGE_ID_SIZE, OK

logger = logging.getLogger("almanet.broker")

# How many topics a connection remembers it published to.
_PUBLISHED_TOPICS_CACHED = 64

_OK_FRAME = encode_response(OK)
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


class Nsqd(Protocol):
    """The broker, as its clients' commands see it."""

    @property
    def options(self) -> BrokerOptions: ...
    @property
    def version(self) -> str: ...
    @property
    def max_req_timeout_ms(self) -> int: ...
    @property
    def clients(self) -> set[Client]: ...

    def new_client_id(self) -> int: ...
    def get_topic(self, name: str) -> Topic: ...


class ProtocolV2(Client):
    """One client connection speaking nsqd's protocol V2."""

    def __init__(self, nsqd: Nsqd) -> None:
        super().__init__(nsqd.options, nsqd.new_client_id(), nsqd.clients)
        options = nsqd.options
        self._version = nsqd.version
        self._max_req_timeout_ms = nsqd.max_req_timeout_ms
        self._get_topic = nsqd.get_topic
        self._parser = CommandParser(options.max_msg_size, options.max_body_size, nsqd.max_req_timeout_ms)
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
        self._published_topics: dict[bytes, Topic] = {}  # by wire name: no decode and lookup per PUB
        self._unparsed: list[bytes] = []  # the reads holding what the parser has not made a command of yet
        self._finished = False  # FINs of this read freed RDY slots

    # --- reading commands -------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._magic_bytes_due:
            self._magic_bytes_due = max(0, self._magic_bytes_due - len(data))
            if not self._magic_bytes_due:
                self.start()
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

    def _read_timed_out(self) -> None:
        self._refuse_cut_short_command()
        self.close()

    def _refuse_cut_short_command(self) -> None:
        """nsqd's error for a command whose body stops coming (end of stream, read deadline)."""
        unparsed = self._parser.buffered
        if unparsed and not self.closed:
            options = self.options
            error = _cut_short_error(b"".join(self._unparsed)[-unparsed:], options.max_msg_size, options.max_body_size)
            if error is not None:
                self._send(encode_error(error.data))

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        channel = self.channel
        if channel is not None and not channel.deleted:
            channel.remove_client(self)

    # --- the message pump -------------------------------------------------

    def deliver(self, message: Message, channel: Channel, now: float) -> bool:
        """Send ``message`` and hold it in flight until FIN, REQ or msg_timeout; whether RDY allows more."""
        if self.sample_rate and random.randrange(100) > self.sample_rate:
            return self.ready_count > self.in_flight_count  # nsqd drops the messages a sampling client does not take
        message.attempts += 1
        message.delivered_at = now
        channel.start_in_flight(message, self.id, now + self.msg_timeout)
        in_flight_count = self.in_flight_count = self.in_flight_count + 1
        self.message_count += 1
        ready_for_more = self.ready_count > in_flight_count
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
        self.negotiate(data)
        if not data.get("feature_negotiation", False):
            self._send(_OK_FRAME)
            return
        options = self.options
        # Go's encoding/json field order; TLS and compression are not offered.
        response = {
            "max_rdy_count": options.max_rdy_count,
            "version": self._version,
            "max_msg_timeout": int(options.max_msg_timeout * 1000),
            "msg_timeout": int(self.msg_timeout * 1000),
            "tls_v1": False,
            "deflate": False,
            "deflate_level": min(6, options.max_deflate_level),
            "max_deflate_level": options.max_deflate_level,
            "snappy": False,
            "sample_rate": self.sample_rate,
            "auth_required": False,
            "output_buffer_size": self.output_buffer_size,
            "output_buffer_timeout": round(self.output_buffer_timeout * 1000),
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
        channel = self._get_topic(params[0].decode()).get_channel(params[1].decode())
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
        max_rdy_count = self.options.max_rdy_count
        if count > max_rdy_count:
            raise CommandError("E_INVALID", f"RDY count {count} out of range 0-{max_rdy_count}")
        self.ready_count = count
        if count <= self.in_flight_count:
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

    def _fin(self, command: Command) -> None:
        channel, message_id = self._in_flight_command(command, "FIN", 1)
        try:
            channel.finish(self.id, message_id)
        except NotInFlight as error:
            self._send_error("E_FIN_FAILED", f"FIN {wire_text(message_id)} failed {error}")
            return
        self.in_flight_count -= 1
        self.finish_count += 1
        self._finished = True

    def _req(self, command: Command) -> None:
        channel, message_id = self._in_flight_command(command, "REQ", 2)
        timeout_ms = parse_base10(command.params[1])
        if timeout_ms is None:
            raise CommandError("E_INVALID", f"REQ could not parse timeout {wire_text(command.params[1])}")
        # nsqd clamps an out-of-range timeout instead of refusing it.
        timeout_ms = min(timeout_ms, self._max_req_timeout_ms)
        try:
            channel.requeue(self.id, message_id, timeout_ms / 1000)
        except NotInFlight as error:
            self._send_error("E_REQ_FAILED", f"REQ {wire_text(message_id)} failed {error}")
            return
        self.in_flight_count -= 1
        self.requeue_count += 1
        channel.dispatch()

    def _touch(self, command: Command) -> None:
        channel, message_id = self._in_flight_command(command, "TOUCH", 1)
        try:
            channel.touch(self.id, message_id, self.msg_timeout, self.options.max_msg_timeout)
        except NotInFlight as error:
            self._send_error("E_TOUCH_FAILED", f"TOUCH {wire_text(message_id)} failed {error}")

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
            topic = self._published_topics[topic_name] = self._get_topic(topic_name.decode())
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
