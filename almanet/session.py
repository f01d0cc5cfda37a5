"""Sessions: routed RPC calls and produce/consume over NSQ.

A session receives replies on a reply topic of its own,
``_almanet.reply.<id>#ephemeral``, subscribed on first call. A call adds its
waiter to the compiled pending-call table and publishes an invocation
envelope to the procedure's topic through the connection its replies come
by (one write a loop iteration carries the invocations and the FINs of the
replies; services reply through the connection an invocation came by, so
the reply comes back through the same nsqd). The reply's call id finds the
waiter in O(1); ``almanet.calls`` expires the calls nobody answered, and
fails those whose connection is lost. Invocations over ``APART_SIZE``, and
with AUTH those to a topic not yet known to be permitted, go through the
session's ``Producer`` instead, as does ``produce``. ``almanet.discovery``
asks whether a URI is served before the first call to it.
docs/PROTOCOL.md describes the wire.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import secrets
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, overload

if TYPE_CHECKING:  # Python 3.11's typing has it; annotations are not evaluated at run time
    from typing_extensions import Unpack

from almanet import conversion, observer
from almanet._speedups.envelope import EnvelopeError, Reply, batch_items, decode
from almanet.calls import Call, Multicall, WaitingCalls
from almanet.discovery import Discovery, DiscoveryQuery
from almanet.errors import CallTimeout, InvalidReply, rpc_error
from almanet.loops import within
from almanet.nsq import Connection, ConnectionOptions, Consumer, Message, Producer
from almanet.nsq.connection import Join
from almanet.nsq.lookupd import POLL_INTERVAL, check_poll_interval
from almanet.observer import Observer, Sending
from almanet.options import (
    CONSUME_OUTPUT_BUFFER,
    SessionOptions,
    check_keywords,
    connection_options,
    split_addresses,
)
from almanet.rpc import (
    APART_SIZE,
    DEFAULT_TIMEOUT,
    DISCOVERY_TOPIC,
    DISCOVERY_WAIT,
    REPLY_CHANNEL,
    SERVED_FOR,
    NamedProcedure,
    check_uri,
    invocation_envelope,
    join_envelopes,
    reply_topic,
)
from almanet.subscription import Subscription, encode_payload, traced_body
from almanet.wire.errors import ConnectionFailed

logger = logging.getLogger("almanet")

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class _Procedure(Protocol[T_co]):
    """For the type checker: a ``Procedure`` whose function returns a ``T_co``."""

    @property
    def uri(self) -> str: ...

    def __call__(self, *args: Any, **kwargs: Any) -> T_co: ...


_MAY_PUBLISH_KEPT = 4096  # topics known permitted, past which they are forgotten (orders.<id>.get)
# Replies are FINed as they arrive: the RDY only needs to keep the pipe full.
_REPLIES_IN_FLIGHT = 2500


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
        self._calls = WaitingCalls()
        self._discovery = Discovery(self._ask_who_serves, self)
        # With AUTH, nsqd closes the connection that published to a topic the secret may not publish to
        # (E_UNAUTHORIZED): calls to a topic go apart (``_publish_call_apart``) until a reply shows they may.
        self._auth_required = False
        self._may_publish: set[str] = set()
        self._replies: Consumer | None = None
        self._replies_subscribed: asyncio.Future[None] | None = None
        self._subscriptions: weakref.WeakSet[Subscription] = weakref.WeakSet()  # to stop on leave
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
        connection = await self._producer.connect()
        self._auth_required |= bool(connection.negotiated.get("auth_required"))
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
        self._calls.fail_all(ConnectionFailed("the session left before the reply came"))
        self._discovery.clear()
        self._may_publish.clear()
        self._auth_required = False  # it may join nsqd of other settings
        self._replies = self._replies_subscribed = None
        # nsqd deletes an ephemeral topic whose last channel left in the background, and a SUB to it
        # meanwhile fails (E_SUB_FAILED): a session that joins again reads a reply topic of its own.
        self._new_identity()
        producer, self._producer = self._producer, Producer(*self.nsqd_addresses, options=self.options)
        await producer.close(timeout)

    def _new_identity(self) -> None:
        self.id = secrets.token_hex(8)
        self.reply_topic = reply_topic(self.id)

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
        watching = observer.current
        if watching is None:
            reply: Reply[Any] = await self._send(uri, payload, timeout, Call, None)
        else:
            reply = await self._send_observed(watching, "call", uri, payload, timeout, Call)
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
        new_call = functools.partial(Multicall, expected=count)
        watching = observer.current
        if watching is None:
            replies: list[Reply[Any] | rpc_error] = await self._send(uri, payload, timeout, new_call, None)
        else:
            replies = await self._send_observed(watching, "multicall", uri, payload, timeout, new_call)
        return replies

    def _send_observed(
        self,
        watching: Observer,
        kind: str,
        uri: str | NamedProcedure,
        payload: Any,
        timeout: float | None,
        new_call: Callable[[asyncio.Future[Any], str, float], Call],
    ) -> Awaitable[Any]:
        """``_send`` through the observer (``kind``: "call" or "multicall")."""
        name = uri if isinstance(uri, str) else uri.uri
        return watching.call(kind, name, functools.partial(self._send, uri, payload, timeout, new_call))

    async def _send(
        self,
        uri: str | NamedProcedure,
        payload: Any,
        timeout: float | None,
        new_call: Callable[[asyncio.Future[Any], str, float], Call],
        sending: Sending | None,
    ) -> Any:
        """Publish an invocation and wait for what ``new_call``'s waiter makes of the replies."""
        topic = check_uri(uri if isinstance(uri, str) else uri.uri)
        timeout = self.timeout if timeout is None else timeout
        if self._replies_subscribed is None or not self._replies_subscribed.done():
            await self._subscribe_replies(timeout)
        loop = asyncio.get_running_loop()
        if self._discovery.served_until.get(topic, 0.0) < loop.time():
            started = loop.time()
            await self._discovery.wait_served(topic, timeout)
            timeout -= loop.time() - started
        call = new_call(loop.create_future(), topic, timeout)
        call.sending = sending
        call_id = self._invoke(call, topic, payload, timeout)
        try:
            return await call.future
        except BaseException as error:
            self._calls.table.pop(call_id)  # cancelled, or failed to publish: gone from the table
            if isinstance(error, CallTimeout):
                self._discovery.served_until.pop(topic, None)  # its service may be gone: the next call asks again
            raise

    async def _ask_who_serves(self, uri: str) -> Call | None:
        """Publish one discovery query for ``uri``: None once a service answered, the query when none did.

        Answered, the query waits for the other services' answers until its wait ends (``DiscoveryQuery``).
        """
        query = DiscoveryQuery(asyncio.get_running_loop().create_future(), uri, self._discovery)
        call_id = self._invoke(query, DISCOVERY_TOPIC, uri, DISCOVERY_WAIT)
        try:
            await query.future
            return None
        except CallTimeout:  # expired: gone from the table
            return query
        except BaseException:
            self._calls.table.pop(call_id)
            raise

    def delay_call(self, uri: str | NamedProcedure, payload: Any, delay: float) -> asyncio.Future[bytes]:
        """Invoke ``uri`` after ``delay`` seconds (DPUB), expecting no reply; awaitable for nsqd's OK."""
        topic = check_uri(uri if isinstance(uri, str) else uri.uri)
        watching = observer.current
        if watching is None:
            return self._delay_call(topic, payload, delay, None)
        return watching.delayed_call(topic, functools.partial(self._delay_call, topic, payload, delay))

    def _delay_call(self, topic: str, payload: Any, delay: float, sending: Sending | None) -> asyncio.Future[bytes]:
        body = invocation_envelope(0, None, 0, None if sending is None else sending.headers, payload)
        if sending is not None:
            sending.sent(len(body), self._producer.connected_to)
        return self._producer.publish(topic, body, delay=delay)

    def _invoke(self, call: Call, topic: str, payload: Any, timeout: float) -> int:
        if self._left:
            raise ConnectionFailed("the session has left")
        calls = self._calls
        connection = calls.connection
        if connection is not None and not connection.is_open:
            calls.lost(connection)  # closing: its calls are all that wait, and cannot be answered
        call_id = calls.add(call, asyncio.get_running_loop().time() + timeout)
        sending = call.sending
        try:
            deadline = int((time.time() + timeout) * 1000)
            headers = None if sending is None else sending.headers
            body = invocation_envelope(call_id, self.reply_topic, deadline, headers, payload)
            if len(body) > APART_SIZE or (self._auth_required and topic not in self._may_publish):
                self._publish_call_apart(topic, body, call)
            else:
                self._publish_call(topic, body, call, join_envelopes if topic in self._discovery.batches else None)
        except BaseException:
            calls.table.pop(call_id)
            raise
        if sending is not None:
            sending.sent(len(body), None if call.origin is None else call.origin.address)
        return call_id

    def _publish_call(self, topic: str, body: bytes, call: Call, join: Join | None) -> None:
        """Publish an invocation through the connection its reply comes by (and the calls' FINs go by).

        ``join``: with the others of this loop iteration to ``topic``, in batches.
        """
        if self._replies is None:  # the session left (and maybe joined again) while the call waited
            raise ConnectionFailed("the session left before the call was sent")
        connection = call.origin = self._replies.publish(topic, body, call, join)
        calls = self._calls
        if connection is not calls.connection:
            calls.connection = connection
            calls.watch(connection)

    def _publish_call_apart(self, topic: str, body: bytes, call: Call) -> None:
        """Publish an invocation through the session's producer, apart from the connections of calls and replies.

        For invocations over ``APART_SIZE``, and with AUTH to a
        topic not known to be permitted: nsqd closes the connection that sent
        a message over its --max-msg-size or to a topic the secret may not
        publish to, and the calls and replies in flight on it would go with
        it. Its reply comes by the connection reading the nsqd the producer
        publishes to (none known while it connects: any). Raises
        ``MessageTooBig`` at once once nsqd's limit is known.
        """
        self._producer.publish_with(call, topic, body)
        address, replies = self._producer.connected_to, self._replies
        connection = replies.connections.get(address) if address is not None and replies is not None else None
        if connection is not None:
            call.origin = connection
            self._calls.watch(connection)

    async def _subscribe_replies(self, timeout: float) -> None:
        """Subscribe to the reply topic (once), within the call's ``timeout``."""
        if self._left:
            raise ConnectionFailed("the session has left")
        if self._replies_subscribed is None:
            self._replies = Consumer(
                self.reply_topic,
                REPLY_CHANNEL,
                self._receive_reply,
                nsqd_tcp_addresses=self.nsqd_addresses,
                max_in_flight=_REPLIES_IN_FLIGHT,
                options=self.options,
            )
            self._replies_subscribed = asyncio.ensure_future(self._replies.start())
            self._replies_subscribed.add_done_callback(self._replies_subscription_done)
        try:
            await within(asyncio.shield(self._replies_subscribed), timeout)
        except asyncio.TimeoutError:
            raise CallTimeout(f"could not subscribe to the replies within {timeout:g} s") from None

    def _replies_subscription_done(self, subscribed: asyncio.Future[None]) -> None:
        if (subscribed.cancelled() or subscribed.exception()) and self._replies_subscribed is subscribed:
            self._replies = self._replies_subscribed = None  # failed: the next call tries again
        elif self._replies is not None:  # the calls' connections: do they require AUTH? (a call need not join)
            connections = self._replies.connections.values()
            self._auth_required |= any(connection.negotiated.get("auth_required") for connection in connections)

    def _receive_reply(self, message: Message) -> None:
        """A reply, or a batch of them (to invocations this session sent in batches)."""
        message.fin()
        try:
            items = batch_items(message.body)
        except EnvelopeError as error:
            logger.warning("%s: dropped a message that is not a batch of replies: %s", self.reply_topic, error)
            return
        if items is None:
            self._take_reply(message.body, message.connection)
        else:
            for item in items:
                self._take_reply(item, message.connection)

    def _take_reply(self, body: bytes, connection: Connection) -> None:
        try:
            reply = decode(body)
        except EnvelopeError as error:
            logger.warning("%s: dropped a message that is not a reply: %s", self.reply_topic, error)
            return
        if not isinstance(reply, Reply):
            logger.warning("%s: dropped an invocation sent to a reply topic", self.reply_topic)
            return
        pending = self._calls.table
        call = pending.get(reply.call_id)
        if call is None:
            logger.debug("%s: a reply to call %d, which is over", self.reply_topic, reply.call_id)
            return
        if call.origin is not None and connection is not call.origin:
            logger.warning(
                "%s: dropped a reply to call %d from nsqd at %s: the call went to nsqd at %s, its replies come by it",
                self.reply_topic,
                reply.call_id,
                connection.address,
                call.origin.address,
            )
            return
        self._discovery.served_until[call.uri] = asyncio.get_running_loop().time() + SERVED_FOR
        if self._auth_required and call.uri not in self._may_publish:
            if len(self._may_publish) >= _MAY_PUBLISH_KEPT:
                self._may_publish.clear()
            self._may_publish.add(call.uri)
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
        watching = observer.current
        if watching is None:
            return self._producer.publish(topic, encode_payload(payload, raw), delay=delay)
        return watching.produce(topic, 1, functools.partial(self._produce, topic, [payload], raw, delay, False))

    def produce_batch(self, topic: str, payloads: Iterable[Any], *, raw: bool = False) -> asyncio.Future[bytes]:
        """Publish several payloads in one MPUB: all of them or none (``raw`` as for ``produce``)."""
        watching = observer.current
        if watching is None:
            return self._producer.publish_batch(topic, [encode_payload(payload, raw) for payload in payloads])
        payloads = list(payloads)
        return watching.produce(topic, len(payloads), functools.partial(self._produce, topic, payloads, raw, 0.0, True))

    def _produce(
        self, topic: str, payloads: list[Any], raw: bool, delay: float, batch: bool, sending: Sending
    ) -> asyncio.Future[bytes]:
        """``produce`` or ``produce_batch`` observed: each body but a raw one carries ``sending``'s headers."""
        headers = None if raw else sending.headers
        bodies = [encode_payload(payload, raw) for payload in payloads]
        if headers:
            bodies = [traced_body(headers, body) for body in bodies]
        sending.sent(sum(map(len, bodies)), self._producer.connected_to)
        if batch:
            return self._producer.publish_batch(topic, bodies)
        return self._producer.publish(topic, bodies[0], delay=delay)

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


def new_session(*addresses: str, **options: Unpack[SessionOptions]) -> Session:
    """A session on the given nsqd (``host:port``) and nsqlookupd (``http://host:port``) addresses (see ``Session``)."""
    check_keywords("new_session", options)
    return Session(*addresses, **options)
