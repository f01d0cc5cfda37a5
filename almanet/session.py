"""Sessions: routed RPC calls and produce/consume over NSQ.

A session receives replies on a reply topic of its own,
``_almanet.reply.<id>#ephemeral``, subscribed on first call. A call adds its
waiter to the compiled pending-call table and publishes an invocation
envelope to the procedure's topic through the connection its replies come
by (one write a loop iteration carries the invocations and the FINs of the
replies; services reply through the connection an invocation came by, so
the reply comes back through the same nsqd). The reply's call id finds the
waiter in O(1). One timer, set for the earliest deadline, expires the calls
nobody answered; when the connection the calls went through is lost, they
fail at once with ``ConnectionError`` (their replies cannot come by it).
``produce`` goes through a ``Producer`` with failover.
docs/PROTOCOL.md describes the wire.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import re
import secrets
import ssl
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypedDict, TypeVar, overload

import msgpack

if TYPE_CHECKING:  # Python 3.11's typing has it; annotations are not evaluated at run time
    from typing_extensions import Unpack

from almanet import conversion
from almanet._speedups.envelope import EnvelopeError, Reply, decode, encode_invocation
from almanet._speedups.frames import is_valid_name
from almanet._speedups.pending import PendingCalls
from almanet.errors import CallTimeout, InvalidReply, NoResponders, UnreadableBody, rpc_error
from almanet.nsq import Consumer, Message, Producer
from almanet.nsq.connection import SEPARATE_PUBLISH_SIZE, AnswerWaiter, Connection, ConnectionOptions
from almanet.nsq.lookupd import POLL_INTERVAL, NsqdWatch, check_poll_interval, http_host_port, lookup
from almanet.wire.addresses import split_address
from almanet.wire.errors import ConnectionFailed
from almanet.wire.protocol import EPHEMERAL_SUFFIX

logger = logging.getLogger("almanet")

# What consume() asks of nsqd unless told otherwise: its output buffer (16 KiB),
# flushed at least every 25 ms (nsqd's shortest; its default is 250 ms).
# Measured on nsqd v1.3.0, consuming a backlog with a commit each: 380k msgs/s
# against 50k when every message is written at once, the RPC connections'
# choice (ConnectionOptions.output_buffer_size -1), where a call's latency
# must not wait for a flush. docs/NSQD.md has the measurements.
CONSUME_OUTPUT_BUFFER: dict[str, Any] = {"output_buffer_size": 0, "output_buffer_timeout": 0.025}

REPLY_TOPIC_PREFIX = "_almanet.reply."
_REPLY_TOPIC = re.compile(r"_almanet\.reply\.[0-9a-f]{16}#ephemeral")


@functools.lru_cache(maxsize=4096)
def is_reply_topic(topic: str) -> bool:
    """Whether ``topic`` is a session's reply topic: the only topics a service publishes replies to."""
    return _REPLY_TOPIC.fullmatch(topic) is not None


class NamedProcedure(Protocol):
    """What a call may name instead of a URI: a ``Procedure`` a service registered (the service is the floor above)."""

    @property
    def uri(self) -> str: ...


T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class _Procedure(Protocol[T_co]):
    """For the type checker: a ``Procedure`` whose function returns a ``T_co``."""

    @property
    def uri(self) -> str: ...

    def __call__(self, *args: Any, **kwargs: Any) -> T_co: ...


REPLY_CHANNEL = "reply#ephemeral"
DEFAULT_TIMEOUT = 60.0

# Before a call publishes an invocation to a URI not known to be served, it
# asks: a discovery query (an invocation whose payload is the URI) goes to
# this topic, where every running service has a channel of its own, and the
# services serving the URI reply. No reply within DISCOVERY_WAIT seconds:
# the call fails with NoResponders and publishes nothing. The topic is
# ephemeral, so queries nobody reads are bounded by nsqd's mem-queue-size.
DISCOVERY_TOPIC = "_almanet.discovery#ephemeral"
DISCOVERY_WAIT = 0.75
# How long a URI stays known to be served after a service said so or a reply
# came from it: within it, calls publish at once. A service that died is
# found out by the first call after that, or the first call that times out.
SERVED_FOR = 5.0
_SERVED_KEPT = 4096  # URIs known served, past which those no longer known are forgotten
# A caller given nsqlookupd waits for the services of a URI listed on other nsqd to come to its own
# (an nsqd that joined); after a wait in vain (a topic left over), calls to it fail at once for this long.
_NOT_WAITED_FOR_AGAIN = 60.0
# Replies are FINed as they arrive: the RDY only needs to keep the pipe full.
_REPLIES_IN_FLIGHT = 2500


@functools.lru_cache(maxsize=4096)
def check_uri(uri: str) -> str:
    """``uri`` if it can name a procedure (an NSQ topic, not ephemeral, not ``_``-reserved), else ``ValueError``."""
    if not isinstance(uri, str):
        raise TypeError(f"a procedure URI must be str, not {type(uri).__name__}")
    raw = uri.encode("utf-8", "surrogateescape")
    if not uri.isascii() or not is_valid_name(raw) or raw.endswith(EPHEMERAL_SUFFIX) or uri.startswith("_"):
        raise ValueError(
            f"invalid procedure URI {uri!r}: 1 to 64 characters of [.a-zA-Z0-9_-] (an NSQ topic name), "
            "not starting with '_' and not ending in #ephemeral"
        )
    return uri


def split_addresses(addresses: Iterable[str]) -> tuple[list[str], list[str]]:
    """nsqd TCP addresses (``host:port``) and nsqlookupd HTTP addresses (``http://host:port``)."""
    nsqd: list[str] = []
    lookupd: list[str] = []
    for address in addresses:
        if not isinstance(address, str):
            raise TypeError(f"an address is a str (host:port, or http://host:port), not {type(address).__name__}")
        if address.startswith("http://"):
            http_host_port(address)  # ValueError now, not at the first lookup
            lookupd.append(address)
        elif "://" in address:
            raise ValueError(f"address {address!r}: nsqd's TCP addresses are host:port, nsqlookupd's http://host:port")
        else:
            split_address(address)
            nsqd.append(address)
    if not nsqd:
        raise ValueError("a session needs at least one nsqd TCP address (host:port) to publish to")
    return nsqd, lookupd


def encode_payload(payload: Any, raw: bool) -> bytes:
    """A produced message's body: ``payload`` msgpack-encoded, or as it is when ``raw`` (then bytes only)."""
    if not raw:
        try:
            return msgpack.packb(payload)  # type: ignore[no-any-return]
        except (TypeError, OverflowError) as refused:  # a dataclass, an enum...: sent as builtins
            return conversion.encode_as_builtins(msgpack.packb, payload, refused)
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise TypeError(f"a raw body is bytes, not {type(payload).__name__}")
    return bytes(payload)


def _encode_invocation(
    call_id: int, reply_to: str | None, deadline: int, headers: dict[str, Any] | None, payload: Any
) -> bytes:
    """The invocation's envelope; a payload the envelope cannot encode (a dataclass, an enum...) is sent as builtins."""
    try:
        return encode_invocation(call_id, reply_to, deadline, headers, payload)
    except TypeError as refused:
        encode = functools.partial(encode_invocation, call_id, reply_to, deadline, headers)
        return conversion.encode_as_builtins(encode, payload, refused)


class _Call:
    """A call waiting for its reply: in the pending-call table, and told the answer to its invocation's publish."""

    __slots__ = ("future", "origin", "published", "timeout", "uri")

    def __init__(self, future: asyncio.Future[Any], uri: str, timeout: float) -> None:
        self.future = future
        self.uri = uri
        self.timeout = timeout
        # The connection the invocation went by, which its replies come by; None: any of the session's nsqd.
        self.origin: Connection | None = None
        self.published = False  # nsqd said OK to the invocation's publish

    def reply(self, reply: Reply[Any]) -> bool:
        """Take ``reply``; True when the call is over."""
        future = self.future
        if not future.done():
            if reply.ok:
                future.set_result(reply)
            else:
                future.set_exception(rpc_error.from_reply_payload(reply.payload))
        return True

    def expire(self) -> None:
        if not self.future.done():
            self.future.set_exception(CallTimeout(self.unanswered(f"calling {self.uri}")))

    def unanswered(self, doing: str) -> str:
        """Why no reply came: the services did not answer, or nsqd did not even take the invocation."""
        if self.published:
            return f"no reply from {self.uri} within {self.timeout:g} s"
        nsqd = f"nsqd at {self.origin.address}" if self.origin is not None else "nsqd"
        return f"{nsqd} did not answer within {self.timeout:g} s: stopped, or overloaded? ({doing})"

    # Told nsqd's answer to the publish of the invocation (see almanet.nsq.connection.AnswerWaiter).

    def done(self) -> bool:
        return self.future.done()

    def set_result(self, answer: bytes) -> None:
        self.published = True  # nsqd has the invocation: now the reply is awaited

    def set_exception(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


class _Multicall(_Call):
    """A call every channel of the procedure answers: replies gathered until the count or the timeout."""

    __slots__ = ("expected", "results")

    def __init__(self, future: asyncio.Future[Any], uri: str, timeout: float, expected: int | None) -> None:
        super().__init__(future, uri, timeout)
        self.expected = expected
        self.results: list[Reply[Any] | rpc_error] = []

    def reply(self, reply: Reply[Any]) -> bool:
        self.results.append(reply if reply.ok else rpc_error.from_reply_payload(reply.payload))
        if self.expected is not None and len(self.results) >= self.expected:
            self.expire()
            return True
        return False

    def expire(self) -> None:
        if not self.future.done():
            self.future.set_result(self.results)


class ConsumedMessage:
    """A message of a consumed topic: commit it (FIN) or roll it back (REQ) once; ``touch()`` meanwhile."""

    __slots__ = ("_message", "attempts", "body", "id", "timestamp")

    def __init__(self, message: Message) -> None:
        self._message = message
        self.body: bytes = message.body
        self.id: bytes = message.id
        self.timestamp: int = message.timestamp  # ns since the epoch, when published
        self.attempts: int = message.attempts

    @property
    def payload(self) -> Any:
        """What ``produce`` sent (the body decoded as one msgpack value); ``UnreadableBody`` for another body."""
        try:
            return msgpack.unpackb(self.body, raw=False, strict_map_key=False)
        except Exception as error:  # msgpack raises ValueError subclasses and others (FormatError, StackError)
            raise UnreadableBody(
                f"message {self.id.decode(errors='replace')} is not one msgpack value ({type(error).__name__}: "
                f"{error}): produced raw or by another client? Read its .body"
            ) from None

    def commit(self) -> None:
        """Done with it (FIN)."""
        self._message.fin()

    def rollback(self, delay: float = 0.0) -> None:
        """Give it back for redelivery after ``delay`` seconds (REQ); its attempts grow by one."""
        self._message.req(delay)

    def touch(self) -> None:
        """Restart its msg_timeout (TOUCH)."""
        self._message.touch()

    @property
    def answered(self) -> bool:
        """Whether it was committed or rolled back."""
        return self._message.answered

    def __repr__(self) -> str:
        return f"ConsumedMessage(id={self.id!r}, attempts={self.attempts}, body={self.body[:40]!r})"


class Subscription:
    """The messages of a topic through a channel, as an async iterator.

    ``async for message in session.consume(topic, channel)``, or ``async with``
    it, or the pair form ``stream, stop = await session.consume(...)``.
    Stopping gives back at once the messages received and not handed out yet.
    Leaving an ``async for`` loop (``break``, or an exception in its body)
    stops the subscription and rolls back, at once, the messages the loop was
    handed and did not commit or roll back by the time it ended (code that
    commits them right after the loop, before awaiting anything, still does).
    """

    def __init__(self, consumer_of: Callable[[Callable[[Message], None]], Consumer]) -> None:
        self._consumer = consumer_of(self._receive)
        self._received: deque[ConsumedMessage] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._started: asyncio.Future[None] | None = None
        self._stopped = False

    def _receive(self, message: Message) -> None:
        if self._stopped:  # sent before nsqd had our RDY 0: back at once
            message.req()
            return
        self._received.append(ConsumedMessage(message))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def start(self) -> None:
        if self._started is None:
            self._started = asyncio.ensure_future(self._consumer.start())
        await self._started

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop consuming: requeue what was not handed out, wait up to ``timeout`` for the rest to be answered."""
        await self._stop_soon(timeout)

    def _stop_soon(self, timeout: float) -> asyncio.Future[None]:
        """``stop``'s RDY 0 and requeues now; what waits for the rest."""
        self._stopped = True
        stopped = self._consumer.stop(timeout)  # RDY 0 first: what is rolled back now is not sent back here
        received, self._received = self._received, deque()
        for message in received:
            message.rollback()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        return stopped

    def __aiter__(self) -> AsyncIterator[ConsumedMessage]:
        return self._handed_out()

    async def _handed_out(self) -> AsyncIterator[ConsumedMessage]:
        """The messages, to an ``async for`` loop; what it leaves unanswered is rolled back if it is left early.

        Leaving the loop (``break``, an exception in its body) closes this
        generator: asyncio schedules ``aclose()`` once the loop lets go of it.
        Without the rollback nsqd would hand the messages out again only
        after their msg_timeout. A loop that ends because the subscription
        stopped rolls back nothing: ``stop()`` waits for what is handled.
        """
        handed: list[ConsumedMessage] = []  # those not known to be answered; the answered are dropped as we go
        stopped_by_itself = False
        try:
            while True:
                try:
                    message = await self.__anext__()
                except StopAsyncIteration:
                    stopped_by_itself = True
                    return
                if handed and handed[-1].answered:  # committed before the next one: kept at one, one at a time
                    handed.pop()
                if len(handed) > 2 * self._consumer.max_in_flight:  # nsqd hands out no more unanswered than that
                    handed = [kept for kept in handed if not kept.answered]
                handed.append(message)
                yield message
        finally:
            if not stopped_by_itself:
                stopped = self._stop_soon(10.0)  # RDY 0 before the rollbacks, or nsqd hands them straight back here
                for message in handed:
                    if not message.answered:
                        message.rollback()
                await stopped

    async def __anext__(self) -> ConsumedMessage:
        if self._started is None or not self._started.done():
            await self.start()
        while not self._received:
            if self._stopped:
                raise StopAsyncIteration
            waiter = self._waiter
            if waiter is None or waiter.done():  # else other readers wait: one future wakes them all
                waiter = self._waiter = asyncio.get_running_loop().create_future()
            await waiter
        return self._received.popleft()

    async def __aenter__(self) -> Subscription:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def __await__(self) -> Generator[Any, None, tuple[Subscription, Callable[[], Any]]]:
        return self._as_pair().__await__()

    async def _as_pair(self) -> tuple[Subscription, Callable[[], Any]]:
        await self.start()
        return self, self.stop


class SessionOptions(TypedDict, total=False):
    """The keywords of ``new_session``, ``Session`` (and ``new_service``, ``Service``).

    ``timeout`` and ``lookupd_poll_interval``, then ``ConnectionOptions``'s
    fields, for every connection of the session; ``output_buffer_size`` and ``output_buffer_timeout`` None (the
    default): calls unbuffered, ``consume`` with ``CONSUME_OUTPUT_BUFFER``.
    """

    timeout: float
    lookupd_poll_interval: float
    auth_secret: str | bytes | None
    tls: bool
    tls_context: ssl.SSLContext | None
    tls_ca_file: str | None
    tls_cert_file: str | None
    tls_key_file: str | None
    tls_server_hostname: str | None
    snappy: bool
    deflate: bool
    deflate_level: int
    heartbeat_interval: float
    msg_timeout: float | None
    max_msg_size: int
    max_body_size: int
    max_frame_size: int
    max_reconnect_interval: float
    connect_timeout: float
    output_buffer_size: int | None
    output_buffer_timeout: float | None
    sample_rate: int
    client_id: str
    hostname: str
    user_agent: str


def check_keywords(function: str, options: Mapping[str, object], own: Iterable[str] = ()) -> None:
    """``TypeError`` as Python words it, for a keyword ``function`` does not take (its ``own``, ``SessionOptions``)."""
    for name in options:
        if name not in SessionOptions.__annotations__:
            known = ", ".join([*own, *SessionOptions.__annotations__])
            raise TypeError(f"{function}() got an unexpected keyword argument {name!r}; it takes: {known}")


class Session:
    """A connection to NSQ for calling procedures and producing and consuming messages.

    ``addresses``: nsqd TCP addresses (``host:port``), at least one; publishes
    go to the first that answers. Addresses written ``http://host:port`` are
    nsqlookupd's: ``consume`` also reads from every nsqd that nsqlookupd lists
    for its topic, a service's procedures from every nsqd it lists at all,
    asked every ``lookupd_poll_interval`` seconds (5 by default); a call no
    service answers asks them whether its services are yet to come to this
    session's nsqd (docs/CLUSTER.md).
    ``timeout``: seconds a call waits for its reply by default. The other
    keywords are the fields of ``almanet.nsq.ConnectionOptions``, for every
    connection of the session (``auth_secret``, ``heartbeat_interval``,
    ``msg_timeout``, nsqd's ``max_msg_size``, ``max_reconnect_interval``...),
    with their defaults, but for the output buffer: ``output_buffer_size``
    and ``output_buffer_timeout`` None leave it to almanet (calls and
    replies unbuffered, ``consume`` buffered: ``CONSUME_OUTPUT_BUFFER``).

    A session that left may join again, on other addresses if need be (``use_addresses``).
    """

    def __init__(self, *addresses: str, **options: Unpack[SessionOptions]) -> None:
        check_keywords("Session.__init__", options)
        self.nsqd_addresses, self.lookupd_addresses = split_addresses(addresses)
        self._new_identity()
        connection: dict[str, Any] = dict(options)
        self.timeout: float = connection.pop("timeout", DEFAULT_TIMEOUT)
        self.lookupd_poll_interval = check_poll_interval(connection.pop("lookupd_poll_interval", POLL_INTERVAL))
        output_buffer_size = connection.pop("output_buffer_size", None)
        output_buffer_timeout = connection.pop("output_buffer_timeout", None)
        self.options = dataclasses.replace(
            ConnectionOptions(),
            output_buffer_size=-1 if output_buffer_size is None else output_buffer_size,
            output_buffer_timeout=output_buffer_timeout,
            **connection,
        )
        # What consume() asks for unless told otherwise, here or to it: nsqd's output buffer.
        given = {"output_buffer_size": output_buffer_size, "output_buffer_timeout": output_buffer_timeout}
        self._consume_buffer = {name: value for name, value in CONSUME_OUTPUT_BUFFER.items() if given[name] is None}
        self._joined = False
        self._producer = Producer(*self.nsqd_addresses, options=self.options)
        self._pending: PendingCalls[_Call] = PendingCalls()
        self._served_until: dict[str, float] = {}  # URI -> loop time until which it is known served
        self._discovering: dict[str, asyncio.Future[None]] = {}  # URI -> its discovery query, shared
        self._not_coming: dict[str, float] = {}  # URI -> loop time until which no service is waited for (below)
        self._replies: Consumer | None = None
        self._replies_subscribed: asyncio.Future[None] | None = None
        self._call_connection: Connection | None = None  # the connection calls go by now
        self._call_connections: set[Connection] = set()  # those calls went by, watched for their loss
        self._subscriptions: weakref.WeakSet[Subscription] = weakref.WeakSet()  # to stop on leave
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._expiry_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._left = False

    # --- joining and leaving -----------------------------------------------------

    async def __aenter__(self) -> Session:
        await self.join()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.leave()

    async def join(self) -> None:
        """Connect to nsqd (again, after ``leave``); raises ``ConnectionError`` when none answers."""
        self._left = False
        self._loop = asyncio.get_running_loop()
        await self._producer.connect()
        self._joined = True

    def use_addresses(self, *addresses: str) -> None:
        """From now on, connect to these nsqd and nsqlookupd ``addresses`` instead (as ``Session`` takes them).

        While the session is not joined (before ``join``, or after ``leave``):
        for tests on a broker of their own, and ``almanet serve --address``.
        """
        if self._joined or self._replies is not None:
            raise RuntimeError("a session changes its addresses only while it is not joined: leave first")
        self.nsqd_addresses, self.lookupd_addresses = split_addresses(addresses)
        self._producer = Producer(*self.nsqd_addresses, options=self.options)

    def use_options(self, **options: Any) -> None:
        """From now on, connect with these connection options changed (``tls_ca_file``, ``auth_secret``...).

        While the session is not joined, as ``use_addresses``: for ``almanet
        serve --tls-ca-file`` and its other connection flags.
        """
        if self._joined or self._replies is not None:
            raise RuntimeError("a session changes its options only while it is not joined: leave first")
        self.options = connection_options(self.options, options, "use_options")
        self._producer = Producer(*self.nsqd_addresses, options=self.options)

    async def leave(self, timeout: float = 10.0) -> None:
        """Stop consuming, fail the calls still waiting (``ConnectionError``), close once publishes are answered."""
        self._left = True
        self._joined = False
        for subscription in list(self._subscriptions):
            await subscription.stop(timeout)
        if self._replies is not None:
            await self._replies.stop(timeout)
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        for call in self._pending.expire(float("inf")):
            call.set_exception(ConnectionFailed("the session left before the reply came"))
        self._served_until.clear()  # the services may be gone when it joins again
        self._not_coming.clear()
        self._replies = self._replies_subscribed = self._call_connection = None
        self._call_connections.clear()
        # nsqd deletes an ephemeral topic whose last channel left in the background, and a SUB to it
        # meanwhile fails (E_SUB_FAILED): a session that joins again reads a reply topic of its own.
        self._new_identity()
        producer, self._producer = self._producer, Producer(*self.nsqd_addresses, options=self.options)
        await producer.close(timeout)

    def _new_identity(self) -> None:
        self.id = secrets.token_hex(8)
        self.reply_topic = f"{REPLY_TOPIC_PREFIX}{self.id}#ephemeral"

    def consumer(
        self,
        topic: str,
        channel: str,
        on_message: Callable[[Message], None],
        max_in_flight: int,
        options: ConnectionOptions | None = None,
        nsqd_watch: NsqdWatch | None = None,
        *,
        ready_everywhere: bool = False,
    ) -> Consumer:
        """An NSQ consumer of ``topic`` through ``channel`` on this session's nsqd (and those ``nsqd_watch`` lists).

        ``options``: the session's unless given (see ``connection_options``); ``ready_everywhere``: ``Consumer``'s.
        """
        return Consumer(
            topic,
            channel,
            on_message,
            nsqd_tcp_addresses=self.nsqd_addresses,
            nsqd_watch=nsqd_watch,
            max_in_flight=max_in_flight,
            options=options or self.options,
            ready_everywhere=ready_everywhere,
        )

    def watch_nsqd(self) -> NsqdWatch | None:
        """A watch of every nsqd this session's nsqlookupd list (None without nsqlookupd), not started."""
        if not self.lookupd_addresses:
            return None
        return NsqdWatch(self.lookupd_addresses, self.lookupd_poll_interval)

    # --- RPC ------------------------------------------------------------------------

    # What the type checker makes of a call: Reply[T] for a Procedure returning T (async or not), or for
    # result_type=T. Only the first two take a Procedure without result_type: with an argument whose type
    # holds Any (**kwargs: Any), mypy gives Any when overloads with differing parameter types match it.
    @overload
    async def call(
        self,
        uri: _Procedure[Coroutine[Any, Any, T]],
        payload: Any,
        *,
        timeout: float | None = ...,
        result_type: None = ...,
    ) -> Reply[T]: ...

    @overload
    async def call(
        self, uri: _Procedure[T], payload: Any, *, timeout: float | None = ..., result_type: None = ...
    ) -> Reply[T]: ...

    @overload
    async def call(
        self, uri: str | NamedProcedure, payload: Any, *, timeout: float | None = ..., result_type: type[T]
    ) -> Reply[T]: ...

    @overload
    async def call(
        self, uri: str | NamedProcedure, payload: Any, *, timeout: float | None = ..., result_type: Any
    ) -> Reply[Any]: ...

    @overload
    async def call(self, uri: str, payload: Any, *, timeout: float | None = ...) -> Reply[Any]: ...

    async def call(
        self, uri: str | NamedProcedure, payload: Any, *, timeout: float | None = None, result_type: Any = None
    ) -> Reply[Any]:
        """Call the procedure at ``uri`` with ``payload``; the reply's ``.payload`` is its result.

        Raises the procedure's ``rpc_error`` (its own class when imported here),
        ``TimeoutError`` when no reply comes within ``timeout`` seconds (as when
        nothing serves the URI), ``ConnectionError`` when the invocation
        cannot be published, ``ValueError`` for an invalid URI.
        ``result_type``: what the result is converted to (``InvalidReply``
        saying why when it cannot be); a ``Procedure`` called has its return
        annotation for it. A payload the envelope cannot encode (a
        dataclass, a pydantic model, an enum...) is sent as builtins.
        """
        if not isinstance(uri, str):  # a Procedure: its annotations say what the payload and result are
            if result_type is None:
                result_type = getattr(uri, "result_type", None)
            if conversion.needs_builtins(getattr(uri, "payload_type", Any)):
                payload = conversion.to_builtins(payload)  # rather than after the envelope refused it
        convert = conversion.converter(result_type) if result_type is not None else None
        reply: Reply[Any] = await self._request(uri, payload, timeout, _Call)
        if convert is None:
            return reply
        try:
            result = convert(reply.payload)
        except conversion.ConversionError as error:
            topic = uri if isinstance(uri, str) else uri.uri
            raise InvalidReply(
                f"the result of {topic} is not a {conversion.type_name(result_type)}: {error}", payload=reply.payload
            ) from None
        return reply if result is reply.payload else Reply(reply.call_id, reply.ok, result)

    async def multicall(
        self, uri: str | NamedProcedure, payload: Any, *, timeout: float | None = None, count: int | None = None
    ) -> list[Reply[Any] | rpc_error]:
        """Call every channel that serves ``uri``; the replies (``rpc_error`` for error replies) within ``timeout``.

        Returns when ``count`` replies have come, if given, else when the timeout passes.
        """
        replies: list[Reply[Any] | rpc_error] = await self._request(
            uri, payload, timeout, functools.partial(_Multicall, expected=count)
        )
        return replies

    async def _request(
        self,
        uri: str | NamedProcedure,
        payload: Any,
        timeout: float | None,
        new_call: Callable[[asyncio.Future[Any], str, float], _Call],
    ) -> Any:
        """Publish an invocation and wait for what ``new_call``'s waiter makes of the replies."""
        topic = check_uri(uri if isinstance(uri, str) else uri.uri)
        timeout = self.timeout if timeout is None else timeout
        if self._replies_subscribed is None or not self._replies_subscribed.done():
            await self._subscribe_replies(timeout)
        loop = self._running_loop()
        if self._served_until.get(topic, 0.0) < loop.time():
            started = loop.time()
            await self._discover(topic, timeout)
            timeout -= loop.time() - started
        call = new_call(loop.create_future(), topic, timeout)
        call_id = self._invoke(call, topic, payload, timeout)
        try:
            return await call.future
        except BaseException as error:
            self._pending.pop(call_id)  # cancelled, or failed to publish: gone from the table
            if isinstance(error, CallTimeout):
                self._served_until.pop(topic, None)  # its service may be gone: the next call asks again
            raise

    async def _discover(self, uri: str, timeout: float) -> None:
        """Return once a service said it serves ``uri``; ``NoResponders`` when none did (see ``DISCOVERY_TOPIC``)."""
        query = self._discovering.get(uri)
        if query is None:
            query = self._discovering[uri] = asyncio.ensure_future(self._ask_who_serves(uri))
            query.add_done_callback(functools.partial(self._discovered, uri))
        # Not cancelled by this call's timeout or cancellation: other calls may wait for it.
        await asyncio.wait((query,), timeout=timeout)
        if not query.done():
            raise CallTimeout(f"no reply from {uri} within {timeout:g} s")
        query.result()

    async def _ask_who_serves(self, uri: str) -> None:
        """Ask until a service answers; ``NoResponders`` once none did and none is on its way (see below)."""
        loop = self._running_loop()
        learning_until = None
        while True:
            query = _Call(loop.create_future(), DISCOVERY_TOPIC, DISCOVERY_WAIT)
            call_id = self._invoke(query, DISCOVERY_TOPIC, uri, DISCOVERY_WAIT)
            try:
                await query.future
                return
            except CallTimeout:
                if not query.published:  # nsqd, not the services, did not answer: say so, not NoResponders
                    raise CallTimeout(query.unanswered(f"asking who serves {uri}")) from None
            finally:
                self._pending.pop(call_id)
            asked = query.origin.address if query.origin is not None else self.nsqd_addresses[0]
            if self._not_coming.get(uri, 0.0) > loop.time():
                elsewhere = []  # waited for lately, in vain
            else:
                elsewhere = await self._listed_elsewhere(uri, asked)
            if learning_until is None:
                learning_until = loop.time() + 2 * self.lookupd_poll_interval
            if not elsewhere:
                raise NoResponders(f"nothing serves {uri}: no service answered within {DISCOVERY_WAIT:g} s")
            if loop.time() >= learning_until:
                # Its topic is left over from services gone (nsqd keeps topics): not waited for again for a while.
                self._not_coming[uri] = loop.time() + _NOT_WAITED_FOR_AGAIN
                raise NoResponders(
                    f"nothing serves {uri} on nsqd at {asked}: nsqlookupd lists its topic on {', '.join(elsewhere)}, "
                    f"but no service there came to this nsqd within {2 * self.lookupd_poll_interval:g} s"
                )

    async def _listed_elsewhere(self, uri: str, asked: str) -> list[str]:
        """The nsqd that nsqlookupd lists with ``uri``'s topic when the nsqd ``asked`` is not one of them.

        A service creates its procedures' topics on every nsqd of the
        cluster: a topic on others and not on ``asked`` means an nsqd that
        joined, which its services reach within their nsqlookupd poll, so
        the query is asked again meanwhile. Without nsqlookupd: none.
        """
        if not self.lookupd_addresses:
            return []
        answers = await asyncio.gather(
            *(lookup(address, uri) for address in self.lookupd_addresses), return_exceptions=True
        )
        listed = {nsqd for answer in answers if not isinstance(answer, BaseException) for nsqd in answer}
        return [] if asked in listed else sorted(listed)

    def _discovered(self, uri: str, query: asyncio.Future[None]) -> None:
        del self._discovering[uri]
        if not query.cancelled() and query.exception() is None:
            served_until, now = self._served_until, self._running_loop().time()
            if len(served_until) >= _SERVED_KEPT:  # URIs called once (orders.<id>.get) are not kept forever
                for known in [known for known, until in served_until.items() if until < now]:
                    del served_until[known]
            served_until[uri] = now + SERVED_FOR

    def delay_call(self, uri: str | NamedProcedure, payload: Any, delay: float) -> asyncio.Future[bytes]:
        """Invoke ``uri`` after ``delay`` seconds (DPUB), expecting no reply; awaitable for nsqd's OK."""
        topic = check_uri(uri if isinstance(uri, str) else uri.uri)
        body = _encode_invocation(0, None, 0, None, payload)
        return self._producer.publish(topic, body, delay=delay)

    def _invoke(self, call: _Call, topic: str, payload: Any, timeout: float) -> int:
        if self._left:
            raise ConnectionFailed("the session has left")
        connection = self._call_connection
        if connection is not None and not connection.is_open:
            self._call_connection_lost(connection)  # closing: its calls are all that wait, and cannot be answered
        deadline = self._running_loop().time() + timeout
        call_id = self._pending.add(call, deadline)
        try:
            body = _encode_invocation(call_id, self.reply_topic, int((time.time() + timeout) * 1000), None, payload)
            if len(body) > SEPARATE_PUBLISH_SIZE:
                self._publish_big_call(topic, body, call)
            else:
                self._publish_call(topic, body, call)
        except BaseException:
            self._pending.pop(call_id)
            raise
        if self._expiry_timer is None or deadline < self._expiry_at:
            self._expire_at(deadline)
        return call_id

    def _publish_call(self, topic: str, body: bytes, call: _Call) -> None:
        """Publish an invocation through the connection its reply comes by (and the calls' FINs go by)."""
        if self._replies is None:  # the session left (and maybe joined again) while the call waited
            raise ConnectionFailed("the session left before the call was sent")
        connection = call.origin = self._replies.publish(topic, body, call)
        if connection is not self._call_connection:
            self._call_connection = connection
            self._watch_call_connection(connection)

    def _publish_big_call(self, topic: str, body: bytes, call: _Call) -> None:
        """Publish an invocation apart (``publish_apart``): its reply comes by the connection reading the nsqd
        the producer publishes to (none known while it connects: any)."""
        self.publish_apart(topic, body, call)
        address, replies = self._producer.connected_to, self._replies
        connection = replies.connections.get(address) if address is not None and replies is not None else None
        if connection is not None:
            call.origin = connection
            self._watch_call_connection(connection)

    def _watch_call_connection(self, connection: Connection) -> None:
        if connection not in self._call_connections:
            self._call_connections.add(connection)
            connection.when_closed(self._call_connection_lost)

    def publish_apart(self, topic: str, body: bytes, answer: AnswerWaiter) -> None:
        """Publish ``body`` through the session's producer, apart from the connections of calls and replies.

        For messages over ``SEPARATE_PUBLISH_SIZE``: nsqd closes the connection
        that sent a message over its --max-msg-size, and the calls and
        replies in flight on it would go with it. Raises ``MessageTooBig``
        at once once nsqd's limit is known.
        """
        self._producer.publish_with(answer, topic, body)

    def _call_connection_lost(self, connection: Connection) -> None:
        """The calls published through ``connection`` fail: their replies would come by it, and cannot."""
        self._call_connections.discard(connection)
        if connection is self._call_connection:
            self._call_connection = None
        lost = ConnectionFailed(f"the connection to nsqd at {connection.address} was lost before the reply came")
        pending = self._pending
        for call_id, call in pending.items():
            if call.origin is connection:
                pending.pop(call_id)
                call.set_exception(lost)

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def _expire_at(self, deadline: float) -> None:
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
        self._expiry_at = deadline
        self._expiry_timer = self._running_loop().call_at(deadline, self._expire)

    def _expire(self) -> None:
        # The loop may run a timer up to its clock resolution early: what was due then is due now.
        self._expiry_timer = None
        for call in self._pending.expire(max(self._running_loop().time(), self._expiry_at)):
            call.expire()
        next_deadline = self._pending.next_deadline()
        if next_deadline is not None:
            self._expire_at(next_deadline)

    async def _subscribe_replies(self, timeout: float) -> None:
        """Subscribe to the reply topic (once), within the call's ``timeout``."""
        if self._left:
            raise ConnectionFailed("the session has left")
        if self._replies_subscribed is None:
            self._replies = self.consumer(self.reply_topic, REPLY_CHANNEL, self._receive_reply, _REPLIES_IN_FLIGHT)
            self._replies_subscribed = asyncio.ensure_future(self._replies.start())
            self._replies_subscribed.add_done_callback(self._replies_subscription_done)
        try:
            await asyncio.wait_for(asyncio.shield(self._replies_subscribed), timeout)
        except asyncio.TimeoutError:
            raise CallTimeout(f"could not subscribe to the replies within {timeout:g} s") from None

    def _replies_subscription_done(self, subscribed: asyncio.Future[None]) -> None:
        if (subscribed.cancelled() or subscribed.exception()) and self._replies_subscribed is subscribed:
            self._replies = self._replies_subscribed = None  # failed: the next call tries again

    def _receive_reply(self, message: Message) -> None:
        message.fin()
        try:
            reply = decode(message.body)
        except EnvelopeError as error:
            logger.warning("%s: dropped a message that is not a reply: %s", self.reply_topic, error)
            return
        if not isinstance(reply, Reply):
            logger.warning("%s: dropped an invocation sent to a reply topic", self.reply_topic)
            return
        pending = self._pending
        call = pending.get(reply.call_id)
        if call is None:
            logger.debug("%s: a reply to call %d, which is over", self.reply_topic, reply.call_id)
            return
        if call.origin is not None and message.connection is not call.origin:
            logger.warning(
                "%s: dropped a reply to call %d from nsqd at %s: the call went to nsqd at %s, its replies come by it",
                self.reply_topic,
                reply.call_id,
                message.connection.address,
                call.origin.address,
            )
            return
        self._served_until[call.uri] = self._running_loop().time() + SERVED_FOR
        if call.reply(reply):
            pending.pop(reply.call_id)

    # --- produce and consume --------------------------------------------------------

    def produce(self, topic: str, payload: Any, *, delay: float = 0.0, raw: bool = False) -> asyncio.Future[bytes]:
        """Publish ``payload`` to ``topic`` (after ``delay`` seconds); awaitable for nsqd's OK.

        The body is ``payload`` msgpack-encoded, so a consumer's
        ``message.payload`` is the same value (``bytes`` included). ``raw``:
        the body is ``payload`` itself, which must be bytes (for consumers
        that are not almanet's; they read ``message.body``). Publishes of
        one loop iteration to one topic leave as one MPUB.
        """
        return self._producer.publish(topic, encode_payload(payload, raw), delay=delay)

    def produce_batch(self, topic: str, payloads: Iterable[Any], *, raw: bool = False) -> asyncio.Future[bytes]:
        """Publish several payloads in one MPUB: all of them or none (``raw`` as for ``produce``)."""
        return self._producer.publish_batch(topic, [encode_payload(payload, raw) for payload in payloads])

    def consume(
        self,
        topic: str,
        channel: str,
        *,
        max_in_flight: int = 100,
        lookupd_poll_interval: float | None = None,
        **options: Any,
    ) -> Subscription:
        """``topic``'s messages through ``channel`` (see ``Subscription``); at most ``max_in_flight`` uncommitted.

        From the session's nsqd, and from every nsqd that its nsqlookupd list
        for ``topic``, asked every ``lookupd_poll_interval`` seconds (the
        session's unless given). ``options`` override the session's
        connection options for this subscription (``msg_timeout=300`` for
        slow work, for instance). Unless given, here or to the session, nsqd
        buffers what it sends: ``CONSUME_OUTPUT_BUFFER``, throughput before
        latency (a message may wait up to 25 ms when traffic is light);
        ``output_buffer_size=-1`` for each message at once.
        """
        subscription = Subscription(
            functools.partial(
                Consumer,
                topic,
                channel,
                nsqd_tcp_addresses=self.nsqd_addresses,
                lookupd_http_addresses=self.lookupd_addresses,
                lookupd_poll_interval=self.lookupd_poll_interval
                if lookupd_poll_interval is None
                else lookupd_poll_interval,
                max_in_flight=max_in_flight,
                options=connection_options(
                    self.options,
                    {**self._consume_buffer, **options},
                    "consume",
                    ("topic", "channel", "max_in_flight", "lookupd_poll_interval"),
                ),
            )
        )
        self._subscriptions.add(subscription)
        return subscription


def connection_options(
    base: ConnectionOptions, overrides: dict[str, Any], function: str, own: Iterable[str] = ()
) -> ConnectionOptions:
    """``base`` with ``overrides``, the keywords ``function`` was given beside its ``own``.

    ``TypeError`` as Python words it for one that is no connection option, listing those ``function`` takes.
    """
    fields = [field.name for field in dataclasses.fields(ConnectionOptions)]
    for name in overrides:
        if name not in fields:
            known = ", ".join([*own, *fields])
            raise TypeError(f"{function}() got an unexpected keyword argument {name!r}; it takes: {known}")
    return dataclasses.replace(base, **overrides) if overrides else base


def new_session(*addresses: str, **options: Unpack[SessionOptions]) -> Session:
    """A session on the given nsqd (``host:port``) and nsqlookupd (``http://host:port``) addresses (see ``Session``)."""
    check_keywords("new_session", options)
    return Session(*addresses, **options)
