"""nsqd's protocol V2 commands (the handlers of its ``protocol_v2.go``), for one client connection.

Commands are handled as nsqd handles them, with its error codes and texts. A
handler refuses a command by raising ``CommandError``, which the connection
(``protocol.ProtocolV2``) sends as an error frame before closing; only FIN,
REQ and TOUCH failures are sent by the handler itself, and leave the
connection open.

IDENTIFY negotiates TLS, snappy and deflate and upgrades the connection;
with ``--tls-required`` every command but IDENTIFY is refused before TLS;
with ``--auth-http-address`` AUTH asks the auth server (see ``auth``) and
PUB, MPUB, DPUB and SUB are checked against its answer. A command that waits
for something (a TLS handshake, the auth server) returns what it waits for
(a ``Wait``); the connection runs the commands sent after it once that is
done, as nsqd's blocking handling of a connection does. Every other command
returns None: it is done.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from almanet._speedups.frames import Command, encode_response, is_valid_name, parse_base10
from almanet.broker import auth
from almanet.broker.client import STATE_CLOSING, STATE_INIT, STATE_SUBSCRIBED, Client
from almanet.broker.options import BrokerOptions
from almanet.broker.topics import Channel, NotInFlight, QueueFull, Topic
from almanet.wire.compression import MAX_INFLATED_READ, DeflateStream, SnappyStream, snappy_available
from almanet.wire.errors import CommandError, go_quote, wire_text
from almanet.wire.protocol import CLOSE_WAIT, MESSAGE_ID_SIZE, OK

logger = logging.getLogger("almanet.broker")

# What a command waits for before the commands sent after it may run.
Wait = Coroutine[Any, Any, None]
Handler = Callable[[Command], Wait | None]

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
    """The broker, as a client connection and its commands see it."""

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


class Commands:
    """The command handlers of one client connection, by command name in ``handlers``.

    ``restart_parser`` drops what the connection read but has not run yet: IDENTIFY's upgrades call it.
    """

    def __init__(self, client: Client, nsqd: Nsqd, restart_parser: Callable[[], None]) -> None:
        options = nsqd.options
        self._client = client
        self._options = options
        self._restart_parser = restart_parser
        self._version = nsqd.version
        self._max_req_timeout_ms = nsqd.max_req_timeout_ms
        self._get_topic = nsqd.get_topic
        self._tls_context = nsqd.tls_context
        self._tls_cipher_numbers = nsqd.tls_cipher_numbers
        self._auth_tls_context = nsqd.auth_tls_context
        self._auth_addresses = options.auth_http_addresses
        self._snappy = options.snappy and snappy_available()
        self._auth_secret = b""
        self._published_topics: dict[bytes, Topic] = {}  # by wire name: no decode and lookup per PUB
        self.finished = False  # FINs freed RDY slots the channel has not refilled yet
        self._all_handlers: dict[bytes, Handler] = {
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
                self._all_handlers[name] = functools.partial(self._authorized_publish, name.decode(), handler)
        self.handlers = self._all_handlers
        # Until TLS: IDENTIFY only (nsqd's enforceTLSPolicy).
        self.awaiting_tls = bool(options.tls_required_mode)
        if self.awaiting_tls:
            self.handlers = dict.fromkeys(self._all_handlers, self._refuse_before_tls)
            self.handlers[b"IDENTIFY"] = self._identify

    # --- IDENTIFY and its upgrades ------------------------------------------

    def _identify(self, command: Command) -> Wait | None:
        client = self._client
        if client.state != STATE_INIT:
            raise CommandError("E_INVALID", "cannot IDENTIFY in current state")
        assert command.body is not None
        data = _decode_identify(command.body)
        client.negotiate(data)
        if not data.get("feature_negotiation", False):
            client.send(_OK_FRAME)
            return None
        options = self._options
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
            "msg_timeout": int(client.msg_timeout * 1000),
            "tls_v1": tls,
            "deflate": deflate,
            "deflate_level": deflate_level,
            "max_deflate_level": options.max_deflate_level,
            "snappy": snappy,
            "sample_rate": client.sample_rate,
            "auth_required": bool(self._auth_addresses),
            "output_buffer_size": client.output_buffer_size,
            "output_buffer_timeout": round(client.output_buffer_timeout * 1000),
        }
        client.send(encode_response(json.dumps(response, separators=(",", ":")).encode()))
        if tls or snappy or deflate:
            return self._upgrade(tls, snappy, deflate_level if deflate else 0)
        return None

    async def _upgrade(self, tls: bool, snappy: bool, deflate_level: int) -> None:
        """IDENTIFY's upgrades in nsqd's order, each answered OK through what it set up."""
        # Bytes that came after IDENTIFY were sent before the client could know of
        # the upgrade: nsqd's new readers drop them, and so does a new parser.
        self._restart_parser()
        client = self._client
        if tls:
            assert self._tls_context is not None
            try:
                await client.upgrade_tls(self._tls_context, self._tls_cipher_numbers)
            except (OSError, asyncio.TimeoutError) as error:  # ssl.SSLError is an OSError
                logger.info("closing %s: TLS handshake failed: %s", client.remote_address, error)
                client.abort()
                if not client.lost:
                    client.connection_lost(error)
                return
            self.handlers = self._all_handlers
            self.awaiting_tls = False
            client.send(_OK_FRAME)
        if snappy:
            client.upgrade_compression(SnappyStream())
            client.snappy = True
            client.send(_OK_FRAME)
        elif deflate_level:
            limit = max(MAX_INFLATED_READ, 2 * self._options.max_body_size)
            client.upgrade_compression(DeflateStream(deflate_level, limit))
            client.deflate = True
            client.send(_OK_FRAME)

    def _refuse_before_tls(self, command: Command) -> None:
        raise refused_before_tls(command.name)

    # --- AUTH and the checks of its answer ----------------------------------

    def _auth(self, command: Command) -> Wait:
        client = self._client
        if client.state != STATE_INIT:
            raise CommandError("E_INVALID", "cannot AUTH in current state")
        if client.auth_state is not None and client.auth_state.authorizations:
            raise CommandError("E_INVALID", "AUTH already set")
        if not self._auth_addresses:
            raise CommandError("E_AUTH_DISABLED", "AUTH disabled")
        assert command.body is not None
        self._auth_secret = command.body
        return self._authenticate()

    async def _query_auth(self) -> auth.AuthState:
        """The auth server's answer for this client's secret (nsqd's QueryAuthd), asked in a thread."""
        options = self._options
        client = self._client
        tls = client.tls
        query = functools.partial(
            auth.query_any,
            self._auth_addresses,
            client.remote_ip,
            tls is not None,
            tls.common_name if tls is not None else "",
            self._auth_secret,
            self._auth_tls_context,
            options.http_client_connect_timeout,
            options.http_client_request_timeout,
        )
        try:
            return await asyncio.get_running_loop().run_in_executor(None, query)
        except auth.AuthError as error:
            # nsqd does not tell untrusted clients why.
            logger.warning("%s: AUTH failed %s", client.remote_address, error)
            raise CommandError("E_AUTH_FAILED", "AUTH failed") from None

    async def _authenticate(self) -> None:
        client = self._client
        state = client.auth_state = await self._query_auth()
        if not state.authorizations:
            raise CommandError("E_UNAUTHORIZED", "AUTH no authorizations found")
        logger.info("%s: AUTH as %r", client.remote_address, state.identity)
        answer = {
            "identity": state.identity,
            "identity_url": state.identity_url,
            "permission_count": len(state.authorizations),
        }
        client.send(encode_response(_go_json(answer)))

    def _authorize(
        self, command: Command, label: str, topic: bytes, channel: bytes, then: Callable[[Command], None]
    ) -> Wait | None:
        """nsqd's CheckAuth, then ``then(command)``: the answer is asked again once its ttl has passed."""
        state = self._client.auth_state
        if state is None or not state.authorizations:
            raise CommandError("E_AUTH_FIRST", f"AUTH required before {label}")
        if state.expired():
            return self._reauthorize(command, label, topic, channel, then)
        _check_permission(state, label, topic, channel)
        then(command)
        return None

    async def _reauthorize(
        self, command: Command, label: str, topic: bytes, channel: bytes, then: Callable[[Command], None]
    ) -> None:
        state = self._client.auth_state = await self._query_auth()
        _check_permission(state, label, topic, channel)
        then(command)

    def _authorized_publish(self, label: str, handler: Callable[[Command], None], command: Command) -> Wait | None:
        return self._authorize(command, label, command.params[0], b"", handler)

    # --- subscribing and the messages in flight -----------------------------

    def _sub(self, command: Command) -> Wait | None:
        client = self._client
        if client.state != STATE_INIT:
            raise CommandError("E_INVALID", "cannot SUB in current state")
        if client.heartbeat_interval <= 0:
            raise CommandError("E_INVALID", "cannot SUB with heartbeats disabled")
        params = command.params
        if len(params) < 2:
            raise CommandError("E_INVALID", "SUB insufficient number of parameters")
        if not is_valid_name(params[0]):
            raise CommandError("E_BAD_TOPIC", f"SUB topic name {go_quote(params[0])} is not valid")
        if not is_valid_name(params[1]):
            raise CommandError("E_BAD_CHANNEL", f"SUB channel name {go_quote(params[1])} is not valid")
        if self._auth_addresses:
            return self._authorize(command, "SUB", params[0], params[1], self._subscribe)
        self._subscribe(command)
        return None

    def _subscribe(self, command: Command) -> None:
        client = self._client
        params = command.params
        channel = self._get_topic(params[0].decode()).get_channel(params[1].decode())
        channel.add_client(client)
        client.channel = channel
        client.state = STATE_SUBSCRIBED
        client.send(_OK_FRAME)

    def _rdy(self, command: Command) -> None:
        client = self._client
        if client.state == STATE_CLOSING:
            return  # nsqd ignores RDY once CLS was sent
        if client.state != STATE_SUBSCRIBED:
            raise CommandError("E_INVALID", "cannot RDY in current state")
        count = 1
        if command.params:
            parsed = parse_base10(command.params[0])
            if parsed is None:
                raise CommandError("E_INVALID", f"RDY could not parse count {wire_text(command.params[0])}")
            count = parsed
        max_rdy_count = self._options.max_rdy_count
        if count > max_rdy_count:
            raise CommandError("E_INVALID", f"RDY count {count} out of range 0-{max_rdy_count}")
        client.ready_count = count
        if count <= client.in_flight_count:
            client.flush()  # nsqd's pump flushes a client ready for no more messages
        assert client.channel is not None
        client.channel.dispatch()

    def _in_flight_command(self, command: Command, label: str, count: int) -> tuple[Channel, bytes]:
        """The checks FIN, REQ and TOUCH share: state, parameter count, message id."""
        client = self._client
        if client.state != STATE_SUBSCRIBED and client.state != STATE_CLOSING:
            raise CommandError("E_INVALID", f"cannot {label} in current state")
        if len(command.params) < count:
            raise CommandError("E_INVALID", f"{label} insufficient number of params")
        message_id = command.params[0]
        if len(message_id) != MESSAGE_ID_SIZE:
            raise CommandError("E_INVALID", "invalid message ID")
        assert client.channel is not None
        return client.channel, message_id

    def _fin(self, command: Command) -> None:
        client = self._client
        channel, message_id = self._in_flight_command(command, "FIN", 1)
        try:
            channel.finish(client.id, message_id)
        except NotInFlight as error:
            client.send_error("E_FIN_FAILED", f"FIN {wire_text(message_id)} failed {error}")
            return
        client.in_flight_count -= 1
        client.finish_count += 1
        self.finished = True

    def _req(self, command: Command) -> None:
        client = self._client
        channel, message_id = self._in_flight_command(command, "REQ", 2)
        timeout_ms = parse_base10(command.params[1])
        if timeout_ms is None:
            raise CommandError("E_INVALID", f"REQ could not parse timeout {wire_text(command.params[1])}")
        # nsqd clamps an out-of-range timeout instead of refusing it.
        timeout_ms = min(timeout_ms, self._max_req_timeout_ms)
        try:
            channel.requeue(client.id, message_id, timeout_ms / 1000)
        except NotInFlight as error:
            client.send_error("E_REQ_FAILED", f"REQ {wire_text(message_id)} failed {error}")
            return
        client.in_flight_count -= 1
        client.requeue_count += 1
        channel.dispatch()

    def _touch(self, command: Command) -> None:
        client = self._client
        channel, message_id = self._in_flight_command(command, "TOUCH", 1)
        try:
            channel.touch(client.id, message_id, client.msg_timeout, self._options.max_msg_timeout)
        except NotInFlight as error:
            client.send_error("E_TOUCH_FAILED", f"TOUCH {wire_text(message_id)} failed {error}")

    def _cls(self, command: Command) -> None:
        client = self._client
        if client.state != STATE_SUBSCRIBED:
            raise CommandError("E_INVALID", "cannot CLS in current state")
        client.ready_count = 0
        client.state = STATE_CLOSING
        client.flush()
        client.send(_CLOSE_WAIT_FRAME)

    def _nop(self, command: Command) -> None:
        pass

    # --- publishing ---------------------------------------------------------

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
        client = self._client
        pub_counts = client.pub_counts
        pub_counts[topic.name] = pub_counts.get(topic.name, 0) + len(bodies)
        client.send(_OK_FRAME)

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


def refused_before_tls(name: bytes) -> CommandError:
    """nsqd's refusal of a command sent before the TLS ``--tls-required`` asks for."""
    return CommandError("E_INVALID", f"cannot {wire_text(name)} in current state (TLS required)")


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
