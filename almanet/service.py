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
import contextvars
import functools
import inspect
import logging
import sys
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

if TYPE_CHECKING:  # Python 3.11's typing has it; annotations are not evaluated at run time
    from typing_extensions import Unpack

from almanet import conversion, loops, observer
from almanet._speedups.envelope import EnvelopeError, Invocation, batch_items, decode
from almanet._speedups.frames import check_name
from almanet.errors import InternalError, InvalidEnvelope, InvalidPayload, describe_error, rpc_error
from almanet.nsq import ConnectionOptions, Consumer, Message, MessagePart, sweeper
from almanet.nsq.lookupd import NsqdWatch
from almanet.observer import Invoked
from almanet.options import SessionOptions, check_keywords, connection_options
from almanet.replies import Replies
from almanet.rpc import (
    BATCH_ITEMS,
    DISCOVERY_TOPIC,
    REPLY_TOPIC_PREFIX,
    SERVICE_FEATURES,
    check_uri,
    is_reply_topic,
)
from almanet.session import Session
from almanet.still_running import StillRunning
from almanet.wire.errors import ConnectionFailed

logger = logging.getLogger("almanet")

DEFAULT_CHANNEL = "rpc"
DEFAULT_MAX_CONCURRENCY = 1000
_DISCOVERY_IN_FLIGHT = 100  # queries are answered as they arrive
# A service started before its nsqd: how often it tries to start again, and says it waits.
_RETRY_START_EVERY = 1.0
_WAITING_SAID_EVERY = 10.0

P = ParamSpec("P")
R = TypeVar("R")

if sys.version_info >= (3, 12):

    def _start_task(coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        return asyncio.Task(coroutine, loop=asyncio.get_running_loop(), eager_start=True)
else:

    def _start_task(coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(coroutine)


class Procedure(Generic[P, R]):
    """A function served under ``uri``; calling it calls the function here.

    ``payload_type`` and ``result_type`` are the function's payload and
    return annotations, resolved (``typing.Any`` when absent; ``None`` for
    ``-> None``); ``raises``, the ``rpc_error`` classes it says it may raise.
    """

    def __init__(
        self,
        function: Callable[P, R],
        uri: str,
        channel: str,
        max_concurrency: int,
        options: ConnectionOptions,
        raises: tuple[type[rpc_error], ...] = (),
    ) -> None:
        self.function = function
        self.uri = uri
        self.channel = channel
        self.max_concurrency = max_concurrency
        # Calls running, and invocations held until one ends: on a cluster each nsqd may hand one out (RDY 1
        # each, ``Consumer.ready_everywhere``) when max_concurrency is below the number of nsqd.
        self.running = 0
        self.held: deque[Message] = deque()
        self.running_held = False  # Service._run_held's loop runs
        self.options = options  # of the connections its invocations come by
        self.raises = raises
        self.is_async = inspect.iscoroutinefunction(function)
        self.payload_type, self.result_type, self.context_names = _inspect_parameters(function, uri)
        # A str, bytes, int, float, bool, list, dict or None payload is checked by isinstance alone
        # (takes); any other annotation is converted (receive), which takes() says of every payload.
        self._check_payload = conversion.converter(self.payload_type)
        plain = conversion.PLAIN_TYPES.get(self.payload_type) if _hashable(self.payload_type) else None
        self.payload_types = plain or ((_Converted,) if self._check_payload is not None else ())
        # What the service runs: a result annotated as a type the envelope does not encode as it is
        # (a dataclass, an enum...) is turned into builtins on the way out.
        self.serve: Callable[..., Any] = (
            _returning_builtins(function, self.is_async) if conversion.needs_builtins(self.result_type) else function
        )
        functools.update_wrapper(self, function)

    def takes(self, payload: Any) -> bool:
        """Whether ``payload`` goes to the function as it is: a payload not annotated, or of its plain type (``str``,
        ``int``...). For any other, ``receive`` checks and converts it."""
        types = self.payload_types
        # bool is an int subclass, but not a number to a procedure taking int or float.
        return not types or (isinstance(payload, types) and (type(payload) is not bool or bool in types))

    def receive(self, payload: Any) -> Any:
        """``payload`` as the function takes it, checked and converted to ``payload_type``; else ``InvalidPayload``."""
        check = self._check_payload
        if check is None:
            return payload
        try:
            return check(payload)
        except conversion.ConversionError as error:
            raise InvalidPayload(f"{self.uri} does not take this payload: {error}") from None
        except Exception as error:  # the payload type's own check (an assert in __post_init__, say)
            raise InvalidPayload(f"{self.uri} does not take this payload: {type(error).__name__}: {error}") from None

    def context(self, session: Session, invocation: Invocation) -> dict[str, Any]:
        """The keyword arguments of a call: those of ``CONTEXT`` the function takes."""
        names = self.context_names
        if names == ():  # takes the payload alone: no dict built for nothing
            return {}
        deadline = invocation.deadline
        context = {
            "session": session,
            "uri": self.uri,
            "caller": invocation.reply_to,
            "deadline": deadline / 1000 if deadline else None,
            "headers": invocation.headers,
        }
        return context if names is None else {name: context[name] for name in names}

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.function(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Procedure({self.uri!r}, channel={self.channel!r})"


class Service:
    """Procedures under ``prefix``, served on the nsqd (and nsqlookupd) ``addresses``.

    Given nsqlookupd addresses, it serves on every nsqd of the cluster: each
    procedure (and the discovery topic) is read from every nsqd nsqlookupd
    lists, its topic created there, whether or not a caller published to it
    yet; an nsqd that joins is read from at the next poll
    (``lookupd_poll_interval``). ``timeout`` and the connection options are
    its session's (see ``Session``).
    """

    def __init__(self, *addresses: str, prefix: str = "", **options: Unpack[SessionOptions]) -> None:
        check_keywords("Service.__init__", options, ("prefix",))
        if prefix:
            check_uri(prefix)
        self.prefix = prefix
        self.session = Session(*addresses, **options)
        self.procedures: list[Procedure[..., Any]] = []
        self._consumers: list[Consumer] = []
        self._discovery: Consumer | None = None
        self._nsqd_watch: NsqdWatch | None = None  # every nsqd of the cluster, given nsqlookupd
        self._replies = Replies()
        self._replies.know(DISCOVERY_TOPIC)
        self._served: frozenset[str] = frozenset()
        # Those whose invocations may come in batches: a procedure running fewer than a batch's items at once
        # takes them alone, so that they spread over its instances.
        self._take_batches: frozenset[str] = frozenset()
        self._running: set[asyncio.Task[None]] = set()
        self._stopped = False
        # What a reply's publish tells its failure to, by URI: one each, not one a reply.
        self._calls_started: dict[Message, float] = {}  # while DEBUG is on: time.perf_counter() at each call
        self._invoked: dict[Message, Invoked] = {}  # the observer's, of the calls running (almanet.observer)
        self._still_running = StillRunning()  # invocations kept from timing out while their call runs
        self._sweeping: asyncio.Task[None] | None = None  # almanet.nsq.sweeper

    @overload
    def procedure(
        self,
        function: Callable[P, R],
        *,
        name: str | None = ...,
        channel: str = ...,
        max_concurrency: int = ...,
        raises: Iterable[type[rpc_error]] = ...,
        **options: Any,
    ) -> Procedure[P, R]: ...

    @overload
    def procedure(
        self,
        function: None = ...,
        *,
        name: str | None = ...,
        channel: str = ...,
        max_concurrency: int = ...,
        raises: Iterable[type[rpc_error]] = ...,
        **options: Any,
    ) -> Callable[[Callable[P, R]], Procedure[P, R]]: ...

    def procedure(
        self,
        function: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        channel: str = DEFAULT_CHANNEL,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        raises: Iterable[type[rpc_error]] = (),
        **options: Any,
    ) -> Any:
        """Register ``function`` (async or sync) as ``<prefix>.<name>``; as ``@procedure`` or ``@procedure(...)``.

        The procedure is called as ``function(payload, session=..., uri=...,
        caller=..., deadline=..., headers=...)``. The payload's annotation
        decides what the function receives: ``str``, ``bytes``, ``int``,
        ``float``, ``bool``, ``list``, ``dict`` or ``None`` are checked as they
        are; dataclasses, msgspec Structs, ``TypedDict``, generic aliases
        (``list[int]``, ``dict[str, Any]``), unions, enums, datetimes and
        pydantic models are validated and converted (``almanet.conversion``);
        a payload that does not fit is answered with ``InvalidPayload``
        saying why. A result the envelope cannot encode (a dataclass, an
        enum...) is sent as builtins; a caller that calls the ``Procedure``
        gets it back as the return annotation says. An annotation that
        cannot be honoured (or resolved) is a ``TypeError`` here. ``raises``:
        the ``rpc_error`` classes the procedure may raise (``Procedure.raises``,
        for its description). ``channel``: instances on one channel share the
        calls, every channel gets each call. ``options`` override the
        service's connection options for this procedure (``msg_timeout``
        longer than the slowest call, for instance: nsqd hands an invocation
        unanswered by then to another instance).
        """
        declared = tuple(raises)
        for error in declared:
            if not (isinstance(error, type) and issubclass(error, rpc_error)):
                raise TypeError(f"raises takes rpc_error subclasses, not {error!r}")
        procedure_options = connection_options(
            self.session.options, options, "procedure", ("function", "name", "channel", "max_concurrency", "raises")
        )

        def register(function: Callable[..., Any]) -> Procedure[..., Any]:
            local_name = name or function.__name__
            uri = check_uri(f"{self.prefix}.{local_name}" if self.prefix else local_name)
            check_name("channel", channel)
            if max_concurrency < 1:
                raise ValueError("max_concurrency must be at least 1")
            if any(known.uri == uri and known.channel == channel for known in self.procedures):
                raise ValueError(f"{uri} is already registered on channel {channel!r}")
            registered = Procedure(function, uri, channel, max_concurrency, procedure_options, declared)
            self.procedures.append(registered)
            self._replies.know(uri)
            return registered

        return register if function is None else register(function)

    # --- running ---------------------------------------------------------------------

    async def start(self) -> None:
        """Join the session and subscribe every procedure (again, after ``stop``); on failure, stop what started."""
        self._stopped = False
        self._replies.open(self.session.options)
        try:
            await self.session.join()
            session = self.session
            if session.lookupd_addresses:
                self._nsqd_watch = NsqdWatch(session.lookupd_addresses, session.lookupd_poll_interval)
            if self._nsqd_watch is not None:
                await self._nsqd_watch.start()
                if self._stopped:
                    raise ConnectionFailed("the service was stopped while it started")
            for registered in self.procedures:
                consumer = Consumer(
                    registered.uri,
                    registered.channel,
                    functools.partial(self._receive_invocations, registered),
                    nsqd_tcp_addresses=session.nsqd_addresses,
                    nsqd_watch=self._nsqd_watch,
                    max_in_flight=registered.max_concurrency,
                    options=registered.options,
                    ready_everywhere=True,
                )
                self._consumers.append(consumer)  # before it starts: stop() meanwhile stops it too
                await consumer.start()
                if self._stopped:
                    raise ConnectionFailed("the service was stopped while it started")
            # Last: a session told that a URI is served finds its procedure subscribed.
            self._served = frozenset(registered.uri for registered in self.procedures)
            self._take_batches = self._served - {
                registered.uri for registered in self.procedures if registered.max_concurrency < BATCH_ITEMS
            }
            self._discovery = Consumer(
                DISCOVERY_TOPIC,
                f"service.{session.id}#ephemeral",
                self._answer_discovery,
                nsqd_tcp_addresses=session.nsqd_addresses,
                nsqd_watch=self._nsqd_watch,
                max_in_flight=_DISCOVERY_IN_FLIGHT,
                options=session.options,
            )
            await self._discovery.start()
            if self._stopped:
                raise ConnectionFailed("the service was stopped while it started")
            addresses = ", ".join([*self.session.nsqd_addresses, *self.session.lookupd_addresses])
            if self._nsqd_watch is not None:
                listed = self._nsqd_watch.known.union(self.session.nsqd_addresses)
                addresses += f" (reading from {len(listed)} nsqd: {', '.join(sorted(listed))})"
            for registered in self.procedures:
                logger.info("serving %s (channel %s) on %s", registered.uri, registered.channel, addresses)
            if not self.procedures:
                logger.warning("serving no procedures on %s: none is registered", addresses)
            # Replies to callers that died create their reply topics again, as do replies to made-up ones.
            sweeping = sweeper.TopicSweeper(REPLY_TOPIC_PREFIX).run(self._nsqd_read)
            if self._sweeping is not None:  # started again without a stop
                self._sweeping.cancel()
            self._sweeping = asyncio.ensure_future(sweeping)
        except BaseException:
            await self.stop()
            raise

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop gracefully: take no more calls, let those running finish and reply (up to ``timeout``), leave."""
        self._stopped = True
        if self._sweeping is not None:
            self._sweeping.cancel()
            self._sweeping = None
        consumers, self._consumers = self._consumers, []
        if self._discovery is not None:  # sessions stop hearing that this service serves
            consumers.append(self._discovery)
            self._discovery = None
        # RDY 0 on every connection at once, so what is requeued from now on is not handed back here.
        stopped = [consumer.stop(timeout) for consumer in consumers]
        for registered in self.procedures:  # never started: back to nsqd, for other instances
            registered.held = self._give_back(registered.held)
        await asyncio.gather(*stopped)  # the calls running finish, and the parts of batches held
        for registered in self.procedures:
            registered.held = self._give_back(registered.held, batches_too=True)
        if self._nsqd_watch is not None:
            self._nsqd_watch.stop()
            self._nsqd_watch = None
        running, self._running = self._running, set()  # one cancelled before its first step never drops itself
        for task in running:  # past the timeout: nsqd redelivers their invocations
            task.cancel()
        self._still_running.clear()
        await self._replies.close(timeout)
        await self.session.leave(timeout)
        # Those of tasks cancelled before their first step, which never answer.
        invoked, self._invoked = self._invoked, {}
        for left in invoked.values():
            left.answered(False, InternalError("CancelledError: the call was cancelled").to_reply_payload())

    def _give_back(self, held: deque[Message], *, batches_too: bool = False) -> deque[Message]:
        """REQ the messages ``held`` (nsqd hands them to other instances); those kept.

        The items of a batch (``MessagePart``) are kept to run, unless
        ``batches_too``: the batch would be handed out whole again, and its
        items already answered would run again.
        """
        kept: deque[Message] = deque()
        for message in held:
            if type(message) is MessagePart and not batches_too:
                kept.append(message)
            else:
                self._still_running.pop(message, None)
                message.req()
        return kept

    def _nsqd_read(self) -> list[str]:
        return sorted({address for consumer in self._consumers for address in consumer.connections})

    async def __aenter__(self) -> Service:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def serve_until_signal(self) -> None:
        """Serve until SIGINT or SIGTERM, then stop gracefully (finishing the calls in flight).

        Started before its nsqd (as compose or systemd may start it), it
        waits for nsqd: it says so at once and every ``_WAITING_SAID_EVERY``
        seconds, tries again every ``_RETRY_START_EVERY``.
        """
        await loops.serve_until_signal(self._start_once_nsqd_answers, self.stop)

    async def _start_once_nsqd_answers(self) -> None:
        loop = asyncio.get_running_loop()
        said_at = None
        while True:
            try:
                await self.start()
                return
            except ConnectionError as error:
                if said_at is None or loop.time() - said_at >= _WAITING_SAID_EVERY:
                    said_at = loop.time()
                    logger.warning("waiting for nsqd (%s); trying every %g s", error, _RETRY_START_EVERY)
            await asyncio.sleep(_RETRY_START_EVERY)

    def serve(self, loop: loops.LoopName | None = None) -> None:
        """Run the service until SIGINT or SIGTERM (blocking), on uvloop when installed, else asyncio's loop.

        ``loop``: ``"asyncio"`` or ``"uvloop"`` instead of that default.

        Unless the application set up logging (the root logger has a handler),
        logs to stderr at INFO: a line for each procedure served once it is,
        errors naming their procedure; at DEBUG, each call too.
        """
        loops.log_to_stderr_unless_configured()
        try:
            loops.run(self.serve_until_signal(), loop or loops.default_loop())
        except asyncio.CancelledError:  # a second signal while it stopped
            logger.warning("stopped at once: the calls still running were cancelled")

    def use_addresses(self, *addresses: str) -> None:
        """Serve on these nsqd and nsqlookupd ``addresses`` instead (``Session.use_addresses``), while stopped."""
        self.session.use_addresses(*addresses)

    def use_options(self, **options: Any) -> None:
        """Serve with these connection options changed (``Session.use_options``), for every procedure, while stopped."""
        self.session.use_options(**options)
        for registered in self.procedures:
            registered.options = connection_options(registered.options, options, "use_options")

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
                and is_reply_topic(query.reply_to)
                and isinstance(query.payload, str)
                and query.payload in self._served
                and (not query.deadline or query.deadline > time.time() * 1000)
            ):
                features = SERVICE_FEATURES if query.payload in self._take_batches else None
                self._replies.send(message, DISCOVERY_TOPIC, query.reply_to, query.call_id, True, features)
        message.fin()

    def _receive_invocations(self, procedure: Procedure[..., Any], message: Message) -> None:
        """An invocation, or a batch of them (``almanet.rpc.BATCH_ITEMS``): each is a part of the message."""
        try:
            items = batch_items(message.body)
        except EnvelopeError as error:
            logger.warning("%s: not a batch of invocations: %s", procedure.uri, error)
            message.fin()
            return
        if items is None:
            self._receive_invocation(procedure, message)
            return
        for part in message.parts(items):
            self._receive_part(procedure, part)

    def _receive_part(self, procedure: Procedure[..., Any], part: MessagePart) -> None:
        try:
            self._receive_invocation(procedure, part)
        except Exception:  # a bug: the other parts go on, and the batch is answered once they are (never REQ)
            logger.exception("%s: an invocation of a batch failed", procedure.uri)
            if not part.answered:
                part.fin()
            invoked = self._invoked.pop(part, None)
            if invoked is not None:
                invoked.answered(False, InternalError("the invocation could not be handled").to_reply_payload())

    def _receive_invocation(self, procedure: Procedure[..., Any], message: Message) -> None:
        if procedure.running >= procedure.max_concurrency:
            # An invocation of a batch is held even while stopping: its batch given back whole, the invocations
            # of it answered already would run again. (The RDY sent counts what batches carry: see Connection.)
            if self._stopped and type(message) is not MessagePart:  # sent before nsqd had the RDY 0: back at once
                message.req()
            else:
                self._hold(procedure, message)
            return
        try:
            invocation = decode(message.body)
        except EnvelopeError as error:
            logger.warning("%s: not an invocation: %s", procedure.uri, error)
            if error.reply_to is not None and error.call_id is not None and is_reply_topic(error.reply_to):
                invalid = InvalidEnvelope(str(error)).to_reply_payload()
                self._replies.send(message, procedure.uri, error.reply_to, error.call_id, False, invalid)
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
        if invocation.reply_to is not None and not is_reply_topic(invocation.reply_to):
            logger.warning(
                "%s: refused a call to reply to %r, not a session's topic", procedure.uri, invocation.reply_to
            )
            message.fin()
            return
        # Observed (almanet.observer), the call starts within what the observer made current: its task, or
        # the thread of a sync procedure, inherits it (contextvars).
        watching = observer.current
        invoked = entered = None
        if watching is not None:
            invoked = watching.invoked(
                procedure.uri,
                procedure.channel,
                invocation.headers,
                message.connection.address,
                len(message.body),
                message.attempts,
                message.id,
            )
            entered = invoked.enter()
            self._invoked[message] = invoked
        try:
            if logger.isEnabledFor(logging.DEBUG):  # ~75 ns a call; at DEBUG, each call is timed and logged (_answer)
                self._calls_started[message] = time.perf_counter()
            payload = invocation.payload
            if not procedure.takes(payload):
                try:
                    payload = procedure.receive(payload)
                except InvalidPayload as refused:
                    logger.warning("refused a payload: %s", refused.args[0])  # which names the URI
                    self._answer(procedure, invocation, False, refused.to_reply_payload(), message)
                    return
            try:
                context = procedure.context(self.session, invocation)
                if procedure.is_async:
                    call = procedure.serve(payload, **context)
                    procedure.running += 1
                    task = _start_task(self._run(call, procedure, invocation, message))
                    if not task.done():
                        # A reference, so the task is not collected while it waits (_run drops it).
                        self._running.add(task)
                        self._still_running.keep(message, invocation.deadline)
                else:
                    work = functools.partial(procedure.serve, payload, **context)
                    if invoked is not None:  # the thread runs it within what the observer made current
                        work = functools.partial(contextvars.copy_context().run, work)
                    future = asyncio.get_running_loop().run_in_executor(None, work)
                    procedure.running += 1
                    future.add_done_callback(functools.partial(self._finish_sync, procedure, invocation, message))
                    self._still_running.keep(message, invocation.deadline)
            except Exception as error:  # the call could not start: answered all the same, never redelivered
                self._answer_error(error, procedure, invocation, message)
        finally:
            if invoked is not None:
                invoked.leave(entered)

    async def _run(
        self, call: Coroutine[Any, Any, Any], procedure: Procedure[..., Any], invocation: Invocation, message: Message
    ) -> None:
        try:
            result = await call
        except BaseException as error:  # cancelled too: answered and FINed, never redelivered
            self._answer_error(error, procedure, invocation, message)
            if not isinstance(error, Exception):
                raise
        else:
            self._answer(procedure, invocation, True, result, message)
        finally:
            self._call_ended(procedure)
            # Here rather than in a done callback, which would cost a loop iteration's handle a call.
            self._running.discard(asyncio.current_task())

    def _finish_sync(
        self, procedure: Procedure[..., Any], invocation: Invocation, message: Message, future: asyncio.Future[Any]
    ) -> None:
        # Not re-raised here: SystemExit or KeyboardInterrupt of a worker thread would stop the loop.
        error = future.exception() if not future.cancelled() else asyncio.CancelledError()
        if error is not None:
            self._answer_error(error, procedure, invocation, message)
        else:
            self._answer(procedure, invocation, True, future.result(), message)
        self._call_ended(procedure)

    def _hold(self, procedure: Procedure[..., Any], message: Message) -> None:
        """Run ``message`` once a call of ``procedure`` ends (at once if none runs)."""
        procedure.held.append(message)
        self._still_running.keep(message, 0)
        self._run_held(procedure)

    def _call_ended(self, procedure: Procedure[..., Any]) -> None:
        procedure.running -= 1
        self._run_held(procedure)

    def _run_held(self, procedure: Procedure[..., Any]) -> None:
        # A held invocation may be answered at once (undecodable, past its deadline, a call that never waits
        # with eager tasks): then the next one's turn, in the loop below rather than a call deeper.
        # Stopping, only the parts of batches are held: they run (see _give_back).
        if procedure.running_held:
            return
        procedure.running_held = True
        try:
            while procedure.held and procedure.running < procedure.max_concurrency:
                held = procedure.held.popleft()
                if held.connection_open:  # else nsqd hands it out again anyway
                    self._receive_invocation(procedure, held)
        finally:
            procedure.running_held = False

    def _answer_error(
        self, error: BaseException, procedure: Procedure[..., Any], invocation: Invocation, message: Message
    ) -> None:
        if self._invoked:
            invoked = self._invoked.get(message)
            if invoked is not None:
                invoked.raised(error)
        if isinstance(error, asyncio.CancelledError):  # the service stopped at once, most likely: no bug to trace
            logger.warning("%s: call %d cancelled", procedure.uri, invocation.call_id)
            error = InternalError("CancelledError: the call was cancelled")
        elif not isinstance(error, rpc_error):
            logger.error("%s raised", procedure.uri, exc_info=error)
            error = InternalError(f"{type(error).__name__}: {describe_error(error)}")
        try:
            payload = error.to_reply_payload()
        except Exception:  # args whose str() raises
            payload = InternalError(f"{type(error).__name__}: {describe_error(error)}").to_reply_payload()
        self._answer(procedure, invocation, False, payload, message)

    def _answer(
        self, procedure: Procedure[..., Any], invocation: Invocation, ok: bool, payload: Any, message: Message
    ) -> None:
        """Reply (when the caller waits for one), then FIN."""
        if invocation.reply_to is not None:
            self._replies.send(message, procedure.uri, invocation.reply_to, invocation.call_id, ok, payload)
        message.fin()
        if self._still_running:  # an empty dict's check for the calls that finished as they started
            self._still_running.pop(message, None)
        if self._calls_started:  # DEBUG was on when a call came (an empty dict's check otherwise)
            self._log_call(procedure.uri, ok, payload, message)
        if self._invoked:
            invoked = self._invoked.pop(message, None)
            if invoked is not None:
                invoked.answered(ok, payload)

    def _log_call(self, uri: str, ok: bool, payload: Any, message: Message) -> None:
        """At DEBUG: the call's URI, time (from its receipt to its reply) and outcome (ok, or the error's name)."""
        started = self._calls_started.pop(message, None)
        if started is not None:
            milliseconds = (time.perf_counter() - started) * 1000
            outcome = "ok" if ok else payload[0] if isinstance(payload, list) and payload else "error"
            logger.debug("%s: %s in %.3f ms", uri, outcome, milliseconds)


CONTEXT = ("session", "uri", "caller", "deadline", "headers")


def _inspect_parameters(function: Callable[..., Any], uri: str) -> tuple[Any, Any, tuple[str, ...] | None]:
    """The payload and result types (``Any``: unchecked), and the context names the function takes (None: all).

    ``TypeError`` naming the procedure for an annotation that does not resolve or cannot be honoured.
    """
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError) as error:
        raise TypeError(f"a procedure needs an inspectable signature: {function!r}") from error
    parameters = list(signature.parameters.values())
    if not parameters or parameters[0].kind not in (parameters[0].POSITIONAL_ONLY, parameters[0].POSITIONAL_OR_KEYWORD):
        raise TypeError(f"a procedure takes the payload as its first positional parameter: {function!r}")
    payload_name = parameters[0].name
    try:
        annotations = conversion.resolve_annotations(function, (payload_name, "return"))
    except TypeError as error:
        raise TypeError(f"procedure {uri}: {error}") from None
    payload_type, result_type = annotations.get(payload_name, Any), annotations.get("return", Any)
    _check_annotation(uri, "payload", payload_type)
    _check_annotation(uri, "return", result_type)
    for parameter in parameters[1:]:
        # A call passes the payload and the keywords of CONTEXT: a parameter it cannot fill fails every call.
        required = parameter.default is parameter.empty and parameter.kind not in (
            parameter.VAR_POSITIONAL,
            parameter.VAR_KEYWORD,
        )
        if required and (parameter.kind is parameter.POSITIONAL_ONLY or parameter.name not in CONTEXT):
            raise TypeError(
                f"procedure {uri}: a call cannot fill its parameter {parameter.name!r} (it passes the payload, then "
                f"the keywords {', '.join(CONTEXT)}): give it a default"
            )
    if any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters):
        return payload_type, result_type, None
    by_keyword = {parameter.name for parameter in parameters[1:] if parameter.kind is not parameter.POSITIONAL_ONLY}
    return payload_type, result_type, tuple(name for name in CONTEXT if name in by_keyword)


def _returning_builtins(function: Callable[..., Any], is_async: bool) -> Callable[..., Any]:
    """``function``, its result turned into builtins (``conversion.to_builtins``)."""
    if is_async:

        async def serve_async(*args: Any, **kwargs: Any) -> Any:
            return conversion.to_builtins(await function(*args, **kwargs))

        return serve_async

    def serve(*args: Any, **kwargs: Any) -> Any:
        return conversion.to_builtins(function(*args, **kwargs))

    return serve


class _Converted:
    """What no payload is an instance of: ``Procedure.takes`` is false for payloads to convert."""


def _check_annotation(uri: str, what: str, annotation: Any) -> None:
    try:
        conversion.converter(annotation)
    except TypeError as error:
        raise TypeError(f"procedure {uri}: its {what} annotation cannot be honoured: {error}") from None


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def new_service(*addresses: str, prefix: str = "", **options: Unpack[SessionOptions]) -> Service:
    """A service whose procedures are named ``<prefix>.<name>``, on the given addresses (see ``Service``)."""
    check_keywords("new_service", options, ("prefix",))
    return Service(*addresses, prefix=prefix, **options)
