"""nsqd's TCP protocol V2 (its ``protocol_v2.go``): the command handlers and the message pump.

Commands are handled as nsqd handles them, with its error codes and texts.
Only FIN, REQ and TOUCH failures leave the connection open; every other
error frame is followed by closing it. The messages a client is sent are in
flight in their channel (see ``topics.Channel``) until it FINs or REQs them
or their msg_timeout passes; the connection itself, its deadlines and what
IDENTIFY negotiated are ``client.Client``'s.

IDENTIFY negotiates TLS, snappy and deflate and upgrades the connection;
with ``--tls-required`` every command but IDENTIFY is refused before TLS;
with ``--auth-http-address`` AUTH asks the auth server (see ``auth``) and
PUB, MPUB, DPUB and SUB are checked against its answer. A command that waits
for something (a TLS handshake, the auth server) holds the commands sent
after it, as nsqd's blocking handling of a connection does.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import re
import ssl
import time
from collections.abc import Callable, Coroutine
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
from almanet.broker import auth
from almanet.broker.client import STATE_CLOSING, STATE_INIT, STATE_SUBSCRIBED, Client
from almanet.broker.options import BrokerOptions
from almanet.broker.topics import Channel, Message, NotInFlight, QueueFull, Topic
from almanet.wire.compression import MAX_INFLATED_READ, DeflateStream, SnappyStream, snappy_available
from almanet.wire.errors import CommandError, ProtocolError, go_quote, wire_text
from almanet.wire.protocol import CLOSE_WAIT, MAGIC_V2, MESSAGE_ID_SIZE, OK

logger = logging.getLogger("almanet.broker")

# How many topics a connection remembers it published to.
_PUBLISHED_TOPICS_CACHED = 64
# The most commands of one client run in one loop iteration: one read may inflate to 16 MiB of them,
# 4 million NOPs, a second of the loop's time if run in one go.
_COMMANDS_PER_ITERATION = 4096

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
    @property
    def tls_context(self) -> ssl.SSLContext | None: ...
    @property
    def tls_cipher_numbers(self) -> dict[str, int]: ...
    @property
    def auth_tls_context(self) -> ssl.SSLContext | None: ...

    def new_client_id(self) -> int: ...
    def get_topic(self, name: str) -> Topic: ...


class _Hold(Exception):
    """A command waits for ``work`` (a TLS handshake, the auth server); the commands after it wait too."""

    def __init__(self, work: Coroutine[Any, Any, None]) -> None:
        super().__init__()
        self.work = work


class ProtocolV2(Client):
    """One client connection speaking nsqd's protocol V2."""

    def __init__(self, nsqd: Nsqd) -> None:
        super().__init__(nsqd.options, nsqd.new_client_id(), nsqd.clients)
        options = nsqd.options
        self._version = nsqd.version
        self._max_req_timeout_ms = nsqd.max_req_timeout_ms
        self._get_topic = nsqd.get_topic
        self._tls_context = nsqd.tls_context
        self._tls_cipher_numbers = nsqd.tls_cipher_numbers
        self._auth_tls_context = nsqd.auth_tls_context
        self._auth_addresses = options.auth_http_addresses
        self._snappy = options.snappy and snappy_available()
        self._parser = CommandParser(options.max_msg_size, options.max_body_size, nsqd.max_req_timeout_ms)
        # nsqd makes a client of a connection, with its message pump, heartbeats
        # and read deadline, once the protocol magic has come.
        self._magic_bytes_due = len(MAGIC_V2)
        self._held: asyncio.Task[None] | None = None  # what the held commands wait for
        self._handlers: dict[bytes, Callable[[Command], None]]
        self._command_handlers: dict[bytes, Callable[[Command], None]] = {
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
        if self._auth_addresses:
            # Publishing is checked against the auth server's answer once the parser checked the command.
            for name, handler in ((b"PUB", self._pub), (b"MPUB", self._mpub), (b"DPUB", self._dpub)):
                self._command_handlers[name] = functools.partial(self._authorized_publish, name.decode(), handler)
        self._handlers = self._command_handlers
        if options.tls_required_mode:
            # Until TLS: IDENTIFY only (nsqd's enforceTLSPolicy).
            self._handlers = dict.fromkeys(self._command_handlers, self._refuse_before_tls)
            self._handlers[b"IDENTIFY"] = self._identify
        self._auth_secret = b""
        self._published_topics: dict[bytes, Topic] = {}  # by wire name: no decode and lookup per PUB
        self._unparsed: list[bytes] = []  # the reads holding what the parser has not made a command of yet
        self._finished = False  # FINs of this read freed RDY slots

    # --- reading commands -------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._decompress is not None:
            try:
                data = self._decompress(data)
            except ProtocolError as error:  # a corrupt stream
                logger.debug("closing %s: %s", self.remote_address, error)
                self.close()
                return
        if self._magic_bytes_due:
            self._magic_bytes_due = max(0, self._magic_bytes_due - len(data))
            if not self._magic_bytes_due:
                self.start()
        self._parser.feed(data)
        if self.reading_held:
            self._note_unparsed(data)  # read before reading paused: run once the hold ends
            return
        self._run_commands(data)

    def _run_commands(self, data: bytes) -> None:
        """Run the commands the parser holds; ``data`` is the latest read."""
        parser = self._parser
        handlers = self._handlers
        command = None
        run = 0
        try:
            for command in parser:
                handlers[command.name](command)
                if self.closed:
                    return
                run += 1
                if run == _COMMANDS_PER_ITERATION:  # a flood (an inflated bomb of NOPs): the others' turn first
                    raise _Hold(asyncio.sleep(0))
        except _Hold as hold:
            self._last_read = self._loop.time()
            self._note_unparsed(data)
            self._hold(hold.work)
            return
        except CommandError as error:
            if handlers is not self._command_handlers and error.code != "E_BAD_PROTOCOL":
                # Before TLS nsqd refuses any command but IDENTIFY before reading further.
                error = self._refusal_before_tls(data) or error
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
        self._note_unparsed(data)
        if handlers is not self._command_handlers and parser.buffered:
            refusal = self._refusal_before_tls(data)
            if refusal is not None:  # its line came, its body need not
                self._send(encode_error(refusal.data))
                self.close()
                return
        if self._finished:
            # The channel refills the RDY slots FINs freed once per read, not once per FIN.
            self._finished = False
            assert self.channel is not None
            self.channel.dispatch()

    def _note_unparsed(self, data: bytes) -> None:
        """Keep the reads that hold what the parser has not made a command of yet."""
        unparsed = self._parser.buffered
        if unparsed > len(data):
            if data:  # a hold's continuation reads nothing new
                self._unparsed.append(data)
        elif unparsed:
            self._unparsed = [data]
        elif self._unparsed:
            self._unparsed = []

    def _pending_bytes(self, data: bytes) -> bytes:
        """What the parser holds, ``data`` (the latest read, not noted yet) included."""
        unparsed = self._parser.buffered
        if not unparsed:
            return b""
        reads = self._unparsed if self._unparsed and self._unparsed[-1] is data else [*self._unparsed, data]
        return b"".join(reads)[-unparsed:]

    # --- holding commands -------------------------------------------------

    def _hold(self, work: Coroutine[Any, Any, None]) -> None:
        """Read and run no more commands until ``work`` is done."""
        self.reading_held = True
        if self._transport is not None:
            self._transport.pause_reading()
        self._held = self._loop.create_task(self._run_held(work))

    async def _run_held(self, work: Coroutine[Any, Any, None]) -> None:
        try:
            await work
        except CommandError as error:
            if not self.closed:
                self._send(encode_error(error.data))
                self.close()
            return
        except Exception:
            logger.exception("closing %s: a command failed", self.remote_address)
            self.abort()
            return
        finally:
            self._held = None
        if self.closed:
            return
        self.reading_held = False
        self._last_read = self._loop.time()
        self._run_commands(b"")
        if not self.closed and not self.reading_held and not self.writing_paused and self._transport is not None:
            self._transport.resume_reading()

    # --- TLS --------------------------------------------------------------

    def _refuse_before_tls(self, command: Command) -> None:
        raise CommandError("E_INVALID", f"cannot {wire_text(command.name)} in current state (TLS required)")

    def _refusal_before_tls(self, data: bytes) -> CommandError | None:
        """nsqd's refusal of the command whose line the parser holds (None for IDENTIFY, or before its line ends)."""
        pending = self._pending_bytes(data)
        line_end = pending.find(b"\n")
        if line_end < 0:
            return None
        name = pending[:line_end].removesuffix(b"\r").split(b" ", 1)[0]
        if name == b"IDENTIFY":
            return None
        return CommandError("E_INVALID", f"cannot {wire_text(name)} in current state (TLS required)")

    async def _upgrade(self, tls: bool, snappy: bool, deflate_level: int) -> None:
        """IDENTIFY's upgrades in nsqd's order, each answered OK through what it set up."""
        # Bytes that came after IDENTIFY were sent before the client could know of
        # the upgrade: nsqd's new readers drop them, and so does a new parser.
        options = self.options
        self._parser = CommandParser(options.max_msg_size, options.max_body_size, self._max_req_timeout_ms)
        self._parser.feed(MAGIC_V2)
        self._unparsed = []
        if tls:
            assert self._tls_context is not None
            try:
                await self.upgrade_tls(self._tls_context, self._tls_cipher_numbers)
            except (OSError, asyncio.TimeoutError) as error:  # ssl.SSLError is an OSError
                logger.info("closing %s: TLS handshake failed: %s", self.remote_address, error)
                self.abort()
                if not self.lost:
                    self.connection_lost(error)
                return
            self._handlers = self._command_handlers
            self._send(_OK_FRAME)
        if snappy:
            self.upgrade_compression(SnappyStream())
            self.snappy = True
            self._send(_OK_FRAME)
        elif deflate_level:
            limit = max(MAX_INFLATED_READ, 2 * self.options.max_body_size)
            self.upgrade_compression(DeflateStream(deflate_level, limit))
            self.deflate = True
            self._send(_OK_FRAME)

    # --- auth -------------------------------------------------------------

    async def _query_auth(self) -> auth.AuthState:
        """The auth server's answer for this client's secret (nsqd's QueryAuthd), asked in a thread."""
        options = self.options
        tls = self.tls
        query = functools.partial(
            auth.query_any,
            self._auth_addresses,
            self.remote_ip,
            tls is not None,
            tls.common_name if tls is not None else "",
            self._auth_secret,
            self._auth_tls_context,
            options.http_client_connect_timeout,
            options.http_client_request_timeout,
        )
        try:
            return await self._loop.run_in_executor(None, query)
        except auth.AuthError as error:
            # nsqd does not tell untrusted clients why.
            logger.warning("%s: AUTH failed %s", self.remote_address, error)
            raise CommandError("E_AUTH_FAILED", "AUTH failed") from None

    async def _authenticate(self) -> None:
        state = self.auth_state = await self._query_auth()
        if not state.authorizations:
            raise CommandError("E_UNAUTHORIZED", "AUTH no authorizations found")
        logger.info("%s: AUTH as %r", self.remote_address, state.identity)
        answer = {
            "identity": state.identity,
            "identity_url": state.identity_url,
            "permission_count": len(state.authorizations),
        }
        self._send(encode_response(_go_json(answer)))

    def _authorize(
        self, command: Command, label: str, topic: bytes, channel: bytes, then: Callable[[Command], None]
    ) -> None:
        """nsqd's CheckAuth, then ``then(command)``: the answer is asked again once its ttl has passed."""
        state = self.auth_state
        if state is None or not state.authorizations:
            raise CommandError("E_AUTH_FIRST", f"AUTH required before {label}")
        if state.expired():
            raise _Hold(self._reauthorize(command, label, topic, channel, then))
        _check_permission(state, label, topic, channel)
        then(command)

    async def _reauthorize(
        self, command: Command, label: str, topic: bytes, channel: bytes, then: Callable[[Command], None]
    ) -> None:
        state = self.auth_state = await self._query_auth()
        _check_permission(state, label, topic, channel)
        then(command)

    def _authorized_publish(self, label: str, handler: Callable[[Command], None], command: Command) -> None:
        self._authorize(command, label, command.params[0], b"", handler)

    def eof_received(self) -> bool:
        self._refuse_cut_short_command()
        self.close()
        return self.tls is None  # keep writing what is pending; TLS has no half-closed connection

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
        if self.lost:
            return
        super().connection_lost(exc)
        held = self._held
        if held is not None and held is not asyncio.current_task():
            held.cancel()  # a thread asking the auth server finishes on its own
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
        tls = self._tls_context is not None and data.get("tls_v1", False)
        deflate = options.deflate and data.get("deflate", False)
        deflate_level = 6
        if deflate and data.get("deflate_level", 0) > 0:
            deflate_level = data["deflate_level"]
        deflate_level = min(deflate_level, options.max_deflate_level)
        snappy = self._snappy and data.get("snappy", False)
        if deflate and snappy:
            raise CommandError("E_IDENTIFY_FAILED", "cannot enable both deflate and snappy compression")
        # Go's encoding/json field order.
        response = {
            "max_rdy_count": options.max_rdy_count,
            "version": self._version,
            "max_msg_timeout": int(options.max_msg_timeout * 1000),
            "msg_timeout": int(self.msg_timeout * 1000),
            "tls_v1": tls,
            "deflate": deflate,
            "deflate_level": deflate_level,
            "max_deflate_level": options.max_deflate_level,
            "snappy": snappy,
            "sample_rate": self.sample_rate,
            "auth_required": bool(self._auth_addresses),
            "output_buffer_size": self.output_buffer_size,
            "output_buffer_timeout": round(self.output_buffer_timeout * 1000),
        }
        self._send(encode_response(json.dumps(response, separators=(",", ":")).encode()))
        if tls or snappy or deflate:
            raise _Hold(self._upgrade(tls, snappy, deflate_level if deflate else 0))

    def _auth(self, command: Command) -> None:
        if self.state != STATE_INIT:
            raise CommandError("E_INVALID", "cannot AUTH in current state")
        if self.auth_state is not None and self.auth_state.authorizations:
            raise CommandError("E_INVALID", "AUTH already set")
        if not self._auth_addresses:
            raise CommandError("E_AUTH_DISABLED", "AUTH disabled")
        assert command.body is not None
        self._auth_secret = command.body
        raise _Hold(self._authenticate())

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
        if self._auth_addresses:
            self._authorize(command, "SUB", params[0], params[1], self._subscribe)
        else:
            self._subscribe(command)

    def _subscribe(self, command: Command) -> None:
        params = command.params
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


def _check_permission(state: auth.AuthState, label: str, topic: bytes, channel: bytes) -> None:
    if not state.allows(topic.decode(), channel.decode()):
        raise CommandError("E_UNAUTHORIZED", f"AUTH failed for {label} on {go_quote(topic)} {go_quote(channel)}")


def _go_json(data: dict[str, Any]) -> bytes:
    """JSON as Go's encoding/json writes it: UTF-8, with <, >, &, U+2028 and U+2029 escaped."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    for char, escape in _GO_JSON_ESCAPES:
        text = text.replace(char, escape)
    return _LONE_SURROGATE.sub("\ufffd", text).encode()


_GO_JSON_ESCAPES = (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029"))


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _bad_identify_json() -> CommandError:
    return CommandError("E_BAD_BODY", "IDENTIFY failed to decode JSON body")
