"""One client connection of the embedded broker: transport, deadlines and negotiated state.

nsqd's ``client_v2.go``: what is sent reaches the client when nsqd's output
buffering would let it (see ``output``); heartbeats, the read deadline (two
heartbeat intervals without a command) and the write deadline (a heartbeat
interval without the client reading) close it as nsqd would; IDENTIFY's
settings are checked and kept here, and the connection upgraded to TLS and
to snappy or deflate compression as IDENTIFY negotiated (nsqd's
``UpgradeTLS``, ``UpgradeSnappy``, ``UpgradeDeflate``). The messages its
channel gives it are sent and held in flight there (see ``topics.Channel``)
until it FINs or REQs them or their msg_timeout passes. The commands it sends
are read by ``protocol.ProtocolV2``, which is this class with nsqd's protocol
V2, and run by ``commands.Commands``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from almanet._speedups.frames import encode_error, encode_message, encode_response
from almanet.broker.options import BrokerOptions
from almanet.broker.output import ClientOutput
from almanet.broker.tls import Negotiated
from almanet.wire.errors import CommandError
from almanet.wire.protocol import HEARTBEAT

if TYPE_CHECKING:
    from almanet.broker.auth import AuthState
    from almanet.broker.topics import Channel, Message
    from almanet.wire.compression import DeflateStream, SnappyStream

logger = logging.getLogger("almanet.broker")

# nsqd's client states, as /stats reports them.
STATE_INIT = 0
STATE_SUBSCRIBED = 3
STATE_CLOSING = 4

# nsqd's default: half its 60 s client timeout.
DEFAULT_HEARTBEAT_INTERVAL = 30.0
# nsqd's default output buffer size (its defaultBufferSize).
DEFAULT_OUTPUT_BUFFER_SIZE = 16 * 1024
# How long nsqd gives a client's TLS handshake.
TLS_HANDSHAKE_TIMEOUT = 5.0

_HEARTBEAT_FRAME = encode_response(HEARTBEAT)


class Client(asyncio.Protocol):
    """nsqd's side of one client connection, but for what its commands do."""

    def __init__(self, options: BrokerOptions, client_id: int, clients: set[Client]) -> None:
        self.options = options
        self.id = client_id  # nsqd's client number, unique in the broker
        self._clients = clients  # the broker's, which this one is in while connected
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._output = ClientOutput(self._loop, DEFAULT_OUTPUT_BUFFER_SIZE, options.output_buffer_timeout)
        self.state = STATE_INIT
        self.closed = False
        self.channel: Channel | None = None
        self.ready_count = 0
        self.in_flight_count = 0  # messages sent and not yet FINed, REQed or timed out
        self.writing_paused = False  # the client does not read what we send
        self.lost = False  # connection_lost came
        # Reading waits for something a command started (a TLS handshake, the auth server).
        self.reading_held = False
        # Negotiated with IDENTIFY; seconds as floats.
        self.client_id = ""
        self.hostname = ""
        self.user_agent = ""
        self.heartbeat_interval = DEFAULT_HEARTBEAT_INTERVAL
        self.msg_timeout = options.msg_timeout
        self.sample_rate = 0
        # Upgrades IDENTIFY negotiated, and AUTH's answer.
        self.tls: Negotiated | None = None
        self.snappy = False
        self.deflate = False
        self._decompress: Callable[[bytes], bytes] | None = None  # every read goes through it once compressed
        self.auth_state: AuthState | None = None
        # For /stats.
        self.remote_ip = ""
        self.remote_address = ""
        self.connect_ts = int(time.time())
        self.message_count = 0
        self.finish_count = 0
        self.requeue_count = 0
        self.pub_counts: dict[str, int] = {}
        self._last_read = self._loop.time()  # of the latest whole command
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
            self.remote_ip = peer[0]
            self.remote_address = f"{peer[0]}:{peer[1]}"
        self._clients.add(self)

    def start(self) -> None:
        """The protocol magic came: nsqd makes a client of the connection, with heartbeats and deadlines."""
        self.connect_ts = int(time.time())
        self._output.restart_ticker(self.options.output_buffer_timeout)
        self._arm_heartbeat()

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
            if not self.reading_held:
                self._transport.resume_reading()
            if self.channel is not None:
                self.channel.dispatch()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.closed = True
        self._output.discard()
        self._clients.discard(self)
        self._stop_heartbeat()
        self._cancel_write_deadline()

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

    def send(self, frame: bytes) -> None:
        """A response, an error or a heartbeat, written with all that is buffered (nsqd's ``Send``)."""
        self._output.send(frame)

    def send_error(self, code: str, description: str) -> None:
        """An error frame that leaves the connection open (FIN, REQ and TOUCH failures)."""
        self.send(encode_error(CommandError(code, description).data))

    def flush(self) -> None:
        """The message pump's flush: the client is ready for no more messages (RDY lowered, CLS)."""
        self._output.flush()

    # --- messages ---------------------------------------------------------

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

    # --- negotiated state -------------------------------------------------

    def negotiate(self, data: dict[str, Any]) -> None:
        """Take IDENTIFY's settings (decoded), checked as nsqd checks them: ``CommandError`` if out of range."""
        options = self.options
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

    @property
    def output_buffer_size(self) -> int:
        return self._output.size

    # --- upgrades ---------------------------------------------------------

    async def upgrade_tls(self, context: ssl.SSLContext, cipher_numbers: dict[str, int]) -> None:
        """nsqd's UpgradeTLS: what was sent goes out in plaintext, then the handshake (5 s at most).

        Raises what the handshake raised (the connection is closed then).
        """
        transport = self._transport
        assert transport is not None
        self._output.write_now()  # IDENTIFY's answer, in plaintext
        self._output.detach()  # a heartbeat due during the handshake waits for it
        secure = await self._loop.start_tls(
            transport, self, context, server_side=True, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT
        )
        if secure is None:
            raise ConnectionResetError("the connection closed during the TLS handshake")
        self._transport = secure
        self.tls = Negotiated(secure.get_extra_info("ssl_object"), cipher_numbers)
        self._output.attach(self._transport)

    def upgrade_compression(self, stream: SnappyStream | DeflateStream) -> None:
        """nsqd's UpgradeSnappy and UpgradeDeflate: what was sent goes out as it was, the rest through ``stream``."""
        assert self._transport is not None
        self._output.write_now()
        self._decompress = stream.decompress
        self._output.attach(self._transport, stream.compress)

    @property
    def output_buffer_timeout(self) -> float:
        return self._output.flush_interval

    # --- deadlines --------------------------------------------------------

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
        self.send(_HEARTBEAT_FRAME)
        self._heartbeat_timer = self._loop.call_later(self.heartbeat_interval, self._heartbeat)

    def _check_read_deadline(self) -> None:
        # nsqd closes a connection that sends nothing for two heartbeat
        # intervals. Commands only note their time; the timer catches up here.
        if self.writing_paused or self.reading_held:
            self._last_read = self._loop.time()
        deadline = self._last_read + 2 * self.heartbeat_interval
        if self._loop.time() < deadline:
            self._read_deadline_timer = self._loop.call_at(deadline, self._check_read_deadline)
            return
        self._read_deadline_timer = None
        logger.debug("closing %s: nothing read for two heartbeat intervals", self.remote_address)
        self._read_timed_out()

    def _read_timed_out(self) -> None:
        """The read deadline passed."""
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


def _check_range(what: str, value: int, low: float, high: float) -> None:
    if not low <= value <= high:
        raise CommandError("E_BAD_BODY", f"IDENTIFY {what} ({value}) is invalid")
