"""Services: procedures registered under URIs, served from NSQ topics.

Each procedure consumes its URI's topic through its channel (``rpc`` unless
told); its consumer's RDY is the procedure's ``max_concurrency``, so nsqd
never hands out more invocations than may run at once. An invocation is
decoded in the connection's ``data_received``; an async procedure runs as a
task (started eagerly where Python has it, so one that never waits finishes
without a loop iteration), a sync one in the loop's thread pool. The reply
is published to the caller's reply topic through the connection the
invocation came by (in one write with the FIN that follows it);
whatever goes wrong with one message, it is FINed, never redelivered forever.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from almanet import loops
from almanet._speedups.envelope import EnvelopeError, Invocation, decode, encode_reply
from almanet._speedups.frames import check_name
from almanet.errors import InternalError, InvalidEnvelope, InvalidPayload, rpc_error
from almanet.nsq import ConnectionOptions, Consumer, Message
from almanet.nsq.connection import SEPARATE_PUBLISH_SIZE
from almanet.session import DISCOVERY_TOPIC, Session, check_uri, connection_options
from almanet.wire.errors import ConnectionFailed, MessageTooBig

logger = logging.getLogger("almanet")

DEFAULT_CHANNEL = "rpc"
DEFAULT_MAX_CONCURRENCY = 1000
_DISCOVERY_IN_FLIGHT = 100  # queries are answered as they arrive

# Payload annotations a procedure's first parameter is checked against.
_CHECKED_PAYLOAD_TYPES: dict[Any, tuple[type, ...]] = {
    str: (str,),
    bytes: (bytes,),
    int: (int,),
    float: (float, int),
    bool: (bool,),
    list: (list,),
    dict: (dict,),
}

if sys.version_info >= (3, 12):

    def _start_task(coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        return asyncio.Task(coroutine, loop=asyncio.get_running_loop(), eager_start=True)
else:

    def _start_task(coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(coroutine)


class _ReplyPublished:
    """Told nsqd's answer to a reply's publish: a failure is logged (the caller will time out)."""

    def done(self) -> bool:
        return False

    def set_result(self, answer: bytes) -> None:
        pass

    def set_exception(self, error: BaseException) -> None:
        logger.error("a reply could not be published: %s", error)


_REPLY_PUBLISHED = _ReplyPublished()


class _BigReplyPublished(_ReplyPublished):
    """Told nsqd's answer to a big reply's publish: one nsqd refuses as too big is answered with an error."""

    def __init__(self, service: Service, invocation: Message, reply_to: str, call_id: int) -> None:
        self.service = service
        self.invocation = invocation  # the error reply goes back the way a small reply would
        self.reply_to = reply_to
        self.call_id = call_id

    def set_exception(self, error: BaseException) -> None:
        if isinstance(error, MessageTooBig):
            self.service._reply_too_big(self.invocation, self.reply_to, self.call_id, error)
        else:
            super().set_exception(error)


class Procedure:
    """A function served under ``uri``; calling it calls the function here."""

    def __init__(
        self,
        function: Callable[..., Any],
        uri: str,
        channel: str,
        max_concurrency: int,
        options: ConnectionOptions,
    ) -> None:
        self.function = function
        self.uri = uri
        self.channel = channel
        self.max_concurrency = max_concurrency
        self.options = options  # of the connections its invocations come by
        self.is_async = inspect.iscoroutinefunction(function)
        self.payload_types, self.context_names = _inspect_parameters(function)
        functools.update_wrapper(self, function)

    def takes(self, payload: Any) -> bool:
        """Whether ``payload`` has the type the function's payload parameter is annotated with, if checked."""
        types = self.payload_types
        # bool is an int subclass, but not a number to a procedure taking int or float.
        return not types or (isinstance(payload, types) and (type(payload) is not bool or bool in types))

    def context(self, session: Session, invocation: Invocation) -> dict[str, Any]:
        """The keyword arguments of a call: those of ``CONTEXT`` the function takes."""
        deadline = invocation.deadline
        context = {
            "session": session,
            "uri": self.uri,
            "caller": invocation.reply_to,
            "deadline": deadline / 1000 if deadline else None,
            "headers": invocation.headers,
        }
        names = self.context_names
        return context if names is None else {name: context[name] for name in names}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Procedure({self.uri!r}, channel={self.channel!r})"


class Service:
    """Procedures under ``prefix``, served on the nsqd (and nsqlookupd) ``addresses`` (see ``Session``)."""

    def __init__(self, *addresses: str, prefix: str = "", **session_options: Any) -> None:
        if prefix:
            check_uri(prefix)
        self.prefix = prefix
        self.session = Session(*addresses, **session_options)
        self.procedures: list[Procedure] = []
        self._consumers: list[Consumer] = []
        self._discovery: Consumer | None = None
        self._served: frozenset[str] = frozenset()
        self._running: set[asyncio.Task[None]] = set()
        self._stopped = False

    def procedure(
        self,
        function: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        channel: str = DEFAULT_CHANNEL,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        **options: Any,
    ) -> Any:
        """Register ``function`` (async or sync) as ``<prefix>.<name>``; as ``@procedure`` or ``@procedure(...)``.

        The procedure is called as ``function(payload, session=..., uri=...,
        caller=..., deadline=..., headers=...)``. A payload annotated ``str``,
        ``bytes``, ``int``, ``float``, ``bool``, ``list`` or ``dict`` is checked:
        another type is answered with ``InvalidPayload``. ``channel``: instances
        on one channel share the calls, every channel gets each call.
        ``options`` override the service's connection options for this
        procedure (``msg_timeout`` longer than the slowest call, for instance:
        nsqd hands an invocation unanswered by then to another instance).
        """

        def register(function: Callable[..., Any]) -> Procedure:
            local_name = name or function.__name__
            uri = check_uri(f"{self.prefix}.{local_name}" if self.prefix else local_name)
            check_name("channel", channel)
            if max_concurrency < 1:
                raise ValueError("max_concurrency must be at least 1")
            if any(known.uri == uri and known.channel == channel for known in self.procedures):
                raise ValueError(f"{uri} is already registered on channel {channel!r}")
            procedure_options = connection_options(self.session.options, options)
            registered = Procedure(function, uri, channel, max_concurrency, procedure_options)
            self.procedures.append(registered)
            return registered

        return register if function is None else register(function)

    # --- running ---------------------------------------------------------------------

    async def start(self) -> None:
        """Join the session and subscribe every procedure (again, after ``stop``); on failure, stop what started."""
        self._stopped = False
        try:
            await self.session.join()
            for registered in self.procedures:
                consumer = self.session.consumer(
                    registered.uri,
                    registered.channel,
                    functools.partial(self._receive_invocation, registered),
                    registered.max_concurrency,
                    registered.options,
                )
                self._consumers.append(consumer)  # before it starts: stop() meanwhile stops it too
                await consumer.start()
                logger.info("serving %s on channel %s", registered.uri, registered.channel)
                if self._stopped:
                    raise ConnectionFailed("the service was stopped while it started")
            # Last: a session told that a URI is served finds its procedure subscribed.
            self._served = frozenset(registered.uri for registered in self.procedures)
            self._discovery = self.session.consumer(
                DISCOVERY_TOPIC, f"service.{self.session.id}#ephemeral", self._answer_discovery, _DISCOVERY_IN_FLIGHT
            )
            await self._discovery.start()
            if self._stopped:
                raise ConnectionFailed("the service was stopped while it started")
        except BaseException:
            await self.stop()
            raise

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop gracefully: take no more calls, let those running finish and reply (up to ``timeout``), leave."""
        self._stopped = True
        if self._discovery is not None:  # first: sessions stop hearing that this service serves
            discovery, self._discovery = self._discovery, None
            await discovery.stop(timeout)
        consumers, self._consumers = self._consumers, []
        await asyncio.gather(*(consumer.stop(timeout) for consumer in consumers))
        for task in list(self._running):  # past the timeout: nsqd redelivers their invocations
            task.cancel()
        await self.session.leave(timeout)

    async def __aenter__(self) -> Service:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def serve_until_signal(self) -> None:
        """Serve until SIGINT or SIGTERM, then stop gracefully (finishing the calls in flight)."""
        await loops.serve_until_signal(self.start, self.stop)

    def serve(self, loop: loops.LoopName = "asyncio") -> None:
        """Run the service until SIGINT or SIGTERM, on asyncio's loop or on uvloop (blocking)."""
        loops.run(self.serve_until_signal(), loop)

    # --- one invocation --------------------------------------------------------------

    def _answer_discovery(self, message: Message) -> None:
        """A session asks whether a URI is served (``session.DISCOVERY_TOPIC``): replied to when it is here."""
        try:
            query = decode(message.body)
        except EnvelopeError as error:
            logger.warning("%s: not a discovery query: %s", DISCOVERY_TOPIC, error)
        else:
            if (
                isinstance(query, Invocation)
                and query.reply_to is not None
                and isinstance(query.payload, str)
                and query.payload in self._served
                and (not query.deadline or query.deadline > time.time() * 1000)
            ):
                self._reply(message, query.reply_to, query.call_id, True, None)
        message.fin()

    def _receive_invocation(self, procedure: Procedure, message: Message) -> None:
        try:
            invocation = decode(message.body)
        except EnvelopeError as error:
            logger.warning("%s: not an invocation: %s", procedure.uri, error)
            if error.reply_to is not None and error.call_id is not None:
                invalid = InvalidEnvelope(str(error)).to_reply_payload()
                self._reply(message, error.reply_to, error.call_id, False, invalid)
            message.fin()
            return
        if not isinstance(invocation, Invocation):
            logger.warning("%s: dropped a reply sent to a procedure", procedure.uri)
            message.fin()
            return
        deadline = invocation.deadline
        if deadline and deadline <= time.time() * 1000:
            logger.debug("%s: dropped call %d, past its deadline", procedure.uri, invocation.call_id)
            message.fin()
            return
        payload = invocation.payload
        if not procedure.takes(payload):
            logger.warning("%s: refused a payload of type %s", procedure.uri, type(payload).__name__)
            refused = InvalidPayload(f"{procedure.uri} does not take a payload of type {type(payload).__name__}")
            self._answer(invocation, False, refused.to_reply_payload(), message)
            return
        try:
            context = procedure.context(self.session, invocation)
            if procedure.is_async:
                task = _start_task(self._run(procedure.function(payload, **context), procedure, invocation, message))
                if not task.done():
                    self._running.add(task)  # a reference, so the task is not collected while it waits
                    task.add_done_callback(self._running.discard)
            else:
                work = functools.partial(procedure.function, payload, **context)
                future = asyncio.get_running_loop().run_in_executor(None, work)
                future.add_done_callback(functools.partial(self._finish_sync, procedure, invocation, message))
        except Exception as error:  # the call could not start: answered all the same, never redelivered
            self._answer_error(error, procedure, invocation, message)

    async def _run(
        self, call: Coroutine[Any, Any, Any], procedure: Procedure, invocation: Invocation, message: Message
    ) -> None:
        try:
            result = await call
        except BaseException as error:  # cancelled too: answered and FINed, never redelivered
            self._answer_error(error, procedure, invocation, message)
            if not isinstance(error, Exception):
                raise
        else:
            self._answer(invocation, True, result, message)

    def _finish_sync(
        self, procedure: Procedure, invocation: Invocation, message: Message, future: asyncio.Future[Any]
    ) -> None:
        # Not re-raised here: SystemExit or KeyboardInterrupt of a worker thread would stop the loop.
        error = future.exception() if not future.cancelled() else asyncio.CancelledError()
        if error is not None:
            self._answer_error(error, procedure, invocation, message)
        else:
            self._answer(invocation, True, future.result(), message)

    def _answer_error(
        self, error: BaseException, procedure: Procedure, invocation: Invocation, message: Message
    ) -> None:
        if not isinstance(error, rpc_error):
            logger.error("%s raised", procedure.uri, exc_info=error)
            error = InternalError(f"{type(error).__name__}: {_describe(error)}")
        try:
            payload = error.to_reply_payload()
        except Exception:  # args whose str() raises
            payload = InternalError(f"{type(error).__name__}: {_describe(error)}").to_reply_payload()
        self._answer(invocation, False, payload, message)

    def _answer(self, invocation: Invocation, ok: bool, payload: Any, message: Message) -> None:
        """Reply (when the caller waits for one), then FIN."""
        if invocation.reply_to is not None:
            self._reply(message, invocation.reply_to, invocation.call_id, ok, payload)
        message.fin()

    def _reply(self, message: Message, reply_to: str, call_id: int, ok: bool, payload: Any) -> None:
        try:
            body = encode_reply(call_id, ok, payload)
        except TypeError as error:
            logger.error("the result of call %d cannot be sent: %s", call_id, error)
            unencodable = InternalError(f"the result cannot be encoded: {error}")
            body = encode_reply(call_id, False, unencodable.to_reply_payload())
        try:
            if len(body) > SEPARATE_PUBLISH_SIZE:
                self.session.publish_apart(reply_to, body, _BigReplyPublished(self, message, reply_to, call_id))
            else:
                message.publish(reply_to, body, _REPLY_PUBLISHED)
        except MessageTooBig as error:
            self._reply_too_big(message, reply_to, call_id, error)
        except (ValueError, TypeError) as error:  # a reply topic no nsqd takes
            logger.warning("cannot reply to %r: %s", reply_to, error)

    def _reply_too_big(self, invocation: Message, reply_to: str, call_id: int, error: MessageTooBig) -> None:
        logger.error("the reply to call %d is too big to send: %s", call_id, error)
        too_big = InternalError(f"the reply is too big to send: {error}").to_reply_payload()
        reply = encode_reply(call_id, False, too_big)
        if invocation.connection_open:
            invocation.publish(reply_to, reply, _REPLY_PUBLISHED)
        else:
            self.session.publish_apart(reply_to, reply, _REPLY_PUBLISHED)


def _describe(error: BaseException) -> str:
    """``str(error)``, or its ``repr`` when its ``__str__`` fails too."""
    try:
        return str(error)
    except Exception:
        return object.__repr__(error)


CONTEXT = ("session", "uri", "caller", "deadline", "headers")


def _inspect_parameters(function: Callable[..., Any]) -> tuple[tuple[type, ...], tuple[str, ...] | None]:
    """The payload types to check (empty: any), and the context names the function takes (None: all, **kwargs)."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError) as error:
        raise TypeError(f"a procedure needs an inspectable signature: {function!r}") from error
    parameters = list(signature.parameters.values())
    if not parameters or parameters[0].kind not in (parameters[0].POSITIONAL_ONLY, parameters[0].POSITIONAL_OR_KEYWORD):
        raise TypeError(f"a procedure takes the payload as its first positional parameter: {function!r}")
    try:
        payload_annotation = inspect.get_annotations(function, eval_str=True).get(parameters[0].name)
    except (NameError, TypeError, SyntaxError):  # annotations that do not resolve here: not checked
        payload_annotation = None
    payload_types = _CHECKED_PAYLOAD_TYPES.get(payload_annotation, ())
    if any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters):
        return payload_types, None
    return payload_types, tuple(name for name in CONTEXT if name in signature.parameters)


def new_service(*addresses: str, prefix: str = "", **options: Any) -> Service:
    """A service whose procedures are named ``<prefix>.<name>``, on the given addresses (see ``Session``)."""
    return Service(*addresses, prefix=prefix, **options)
