"""OpenTelemetry traces and metrics of almanet's calls, invocations and messages (the ``almanet[otel]`` extra).

``AlmanetInstrumentor().instrument()`` installs an observer
(``almanet.observer``) that makes a span of each call, invocation, produced
and consumed message, and records their metrics, through OpenTelemetry's API
(to whatever SDK and exporters the application set up).
``opentelemetry-instrument`` finds the instrumentor under the
``opentelemetry_instrumentor`` entry point. almanet imports this module only
when asked to: ``import almanet`` never imports OpenTelemetry.

The trace context travels in an invocation's headers, and in a produced
body wrapped with it (``almanet.subscription.traced_body``), as W3C Trace
Context (``traceparent``) by default: OpenTelemetry's global propagator.
Attributes follow OpenTelemetry's RPC and messaging semantic conventions;
docs/OBSERVABILITY.md lists the spans, their attributes and the metrics.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Collection, Iterable
from timeit import default_timer
from typing import Any, TypeVar

from opentelemetry import context, metrics, propagate, trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from almanet import observer
from almanet._version import __version__
from almanet.errors import CallTimeout, NoResponders, describe_error, rpc_error
from almanet.observer import Consumed, Invoked, Sending

T = TypeVar("T")

logger = logging.getLogger("almanet")

SYSTEM = "almanet"  # rpc.system.name
MESSAGING_SYSTEM = "nsq"  # messaging.system
_EMPTY = context.Context()


class AlmanetInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Traces and metrics of almanet through OpenTelemetry (see the module).

    ``instrument()`` takes OpenTelemetry's usual ``tracer_provider`` and
    ``meter_provider`` (the global ones by default), and ``trace_produced``:
    False leaves produced bodies as they are, for consumers that do not
    unwrap them (not almanet's, or an older almanet): the consumer spans of
    their messages then begin traces of their own.
    """

    def instrumentation_dependencies(self) -> Collection[str]:
        return ()

    def _instrument(self, **kwargs: Any) -> None:
        watching = OpenTelemetryObserver(
            kwargs.get("tracer_provider"), kwargs.get("meter_provider"), kwargs.get("trace_produced", True)
        )
        # With neither a tracer nor a meter provider that records (none set up yet, or OTEL_SDK_DISABLED's no-op
        # ones), nothing is installed, and almanet's calls pay for nothing: OpenTelemetry's no-op API costs
        # more per call than almanet's own work.
        if watching.records:
            observer.install(watching)
        elif watching.waits_for_providers:
            logger.warning(
                "almanet is not instrumented: OpenTelemetry has no tracer provider or meter provider set up yet "
                "(set them up first, or pass them to instrument())"
            )

    def _uninstrument(self, **kwargs: Any) -> None:
        observer.install(None)


@functools.lru_cache(maxsize=256)
def _nsqd_attributes(nsqd: str) -> dict[str, Any]:
    host, _, port = nsqd.rpartition(":")
    return {"server.address": host.strip("[]"), "server.port": int(port)} if port.isdigit() else {}


def _error_type(error: BaseException) -> str:
    """What ``error.type`` says: an ``rpc_error``'s name (the remote one), else the exception's class."""
    return error.name if isinstance(error, rpc_error) else type(error).__qualname__


def _record_error(span: Span, error: BaseException) -> str:
    """``error`` on ``span``; its ``error.type``. Never raises: an exception's ``__str__`` may (its args came off
    the wire, say), and an observer must not change what almanet does."""
    name = _error_type(error)
    if span.is_recording():
        description = describe_error(error)
        span.set_status(Status(StatusCode.ERROR, f"{name}: {description}"))
        span.set_attribute("error.type", name)
        try:
            span.record_exception(error, attributes={"exception.type": name})
        except Exception:
            span.add_event("exception", {"exception.type": name, "exception.message": description})
    return name


class _Sending:
    """An invocation or a produced message being sent (``almanet.observer.Sending``)."""

    __slots__ = ("headers", "span")

    def __init__(self, span: Span, headers: dict[str, str] | None) -> None:
        self.span = span
        self.headers = headers

    def sent(self, size: int, nsqd: str | None) -> None:
        span = self.span
        if span.is_recording():
            span.set_attribute("messaging.message.body.size", size)
            if nsqd is not None:
                span.set_attributes(_nsqd_attributes(nsqd))


class _Invocation:
    """An invocation running (``almanet.observer.Invoked``): its server span, current while its call starts (in
    the context the caller sent, its baggage included)."""

    __slots__ = ("_context", "_observer", "_span", "_started", "_uri")

    def __init__(self, owner: OpenTelemetryObserver, span: Span, received: context.Context, uri: str) -> None:
        self._observer = owner
        self._span = span
        self._context = received
        self._uri = uri
        self._started = default_timer()

    def enter(self) -> object:
        return context.attach(trace.set_span_in_context(self._span, self._context))

    def leave(self, entered: object) -> None:
        context.detach(entered)  # type: ignore[arg-type]

    def raised(self, error: BaseException) -> None:
        _record_error(self._span, error)

    def answered(self, ok: bool, payload: Any) -> None:
        span = self._span
        if ok:
            status = "ok"
        else:
            status = payload[0] if type(payload) is list and payload and type(payload[0]) is str else "rpc_error"
            if span.is_recording():
                span.set_attribute("error.type", status)
                span.set_status(Status(StatusCode.ERROR, status))
        if span.is_recording():
            span.set_attribute("rpc.response.status_code", status)
        span.end()
        self._observer.server_duration.record(
            default_timer() - self._started, self._observer.outcome_attributes(self._uri, status)
        )


class _Consumption:
    """A consumed message (``almanet.observer.Consumed``): its consumer span, until its commit or rollback."""

    __slots__ = ("_attributes", "_observer", "_span", "_started")

    def __init__(self, owner: OpenTelemetryObserver, span: Span, attributes: dict[str, Any]) -> None:
        self._observer = owner
        self._span = span
        self._attributes = attributes
        self._started = default_timer()

    def answered(self, committed: bool) -> None:
        outcome = "commit" if committed else "rollback"
        self._span.set_attribute("almanet.outcome", outcome)
        self._span.end()
        self._observer.process_duration.record(
            default_timer() - self._started, {**self._attributes, "almanet.outcome": outcome}
        )


class OpenTelemetryObserver:
    """The observer ``AlmanetInstrumentor`` installs: spans and metrics through OpenTelemetry's API."""

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None,
        meter_provider: metrics.MeterProvider | None,
        trace_produced: bool,
    ) -> None:
        self._tracer = trace.get_tracer(__name__, __version__, tracer_provider)
        meter = metrics.get_meter(__name__, __version__, meter_provider)
        # The global proxies, while no provider is set; the no-op ones, for good.
        tracer_waits = isinstance(self._tracer, trace.ProxyTracer)
        meter_waits = type(meter).__name__ == "_ProxyMeter"  # opentelemetry.metrics gives it no public name
        self.waits_for_providers = tracer_waits or meter_waits
        self.records = not (
            (tracer_waits or isinstance(self._tracer, trace.NoOpTracer))
            and (meter_waits or isinstance(meter, metrics.NoOpMeter))
        )
        self._trace_produced = trace_produced
        self._calls_in_flight: dict[str, int] = {}
        self._outcomes: dict[tuple[str, str], dict[str, str]] = {}
        self.client_duration = meter.create_histogram(
            "rpc.client.call.duration", "s", "How long calls took, from the call to the reply (or the error)"
        )
        self.server_duration = meter.create_histogram(
            "rpc.server.call.duration", "s", "How long invocations took, from their start to their answer"
        )
        self.process_duration = meter.create_histogram(
            "messaging.process.duration", "s", "How long consumed messages took, from receipt to commit or rollback"
        )
        self.publish_duration = meter.create_histogram(
            "messaging.client.operation.duration", "s", "How long produces took, until nsqd's answer"
        )
        self._sent = meter.create_counter("messaging.client.sent.messages", "{message}", "Messages produced")
        self._consumed = meter.create_counter("messaging.client.consumed.messages", "{message}", "Messages consumed")
        self._no_responders = meter.create_counter(
            "almanet.rpc.client.no_responders", "{call}", "Calls no service answered the discovery query of"
        )
        self._timeouts = meter.create_counter(
            "almanet.rpc.client.timeouts", "{call}", "Calls that got no reply within their timeout"
        )
        self._redeliveries = meter.create_counter(
            "almanet.redeliveries", "{message}", "Invocations and consumed messages delivered more than once"
        )
        self._reconnects = meter.create_counter(
            "almanet.nsq.reconnects", "{connection}", "Connections to nsqd lost and open again"
        )
        meter.create_observable_up_down_counter(
            "almanet.rpc.client.active_calls", [self._observe_calls_in_flight], "{call}", "Calls waiting for a reply"
        )

    def outcome_attributes(self, uri: str, status: str) -> dict[str, str]:
        """The attributes of a duration by URI and outcome (one dict each, made once)."""
        attributes = self._outcomes.get((uri, status))
        if attributes is None:
            attributes = {"rpc.system.name": SYSTEM, "rpc.method": uri, "rpc.response.status_code": status}
            if status != "ok":
                attributes["error.type"] = status
            if len(self._outcomes) < 4096:
                self._outcomes[uri, status] = attributes
        return attributes

    def _observe_calls_in_flight(self, options: CallbackOptions) -> Iterable[Observation]:
        # In the reader's thread: a copy first (one C call), as the loop's thread changes the dict.
        return [Observation(count, {"rpc.method": uri}) for uri, count in self._calls_in_flight.copy().items()]

    def _sending(self, span: Span) -> _Sending:
        headers: dict[str, str] = {}
        propagate.inject(headers, trace.set_span_in_context(span))
        return _Sending(span, headers or None)

    @staticmethod
    def _received(headers: dict[str, Any] | None) -> context.Context:
        """The context a received invocation or message carries: built on an empty one, never on what is current
        where it is received (a span of whoever opened the connection, or of the call that ended before)."""
        if not headers:
            return _EMPTY
        try:
            return propagate.extract(headers, _EMPTY)
        except Exception:  # headers from the wire: not OpenTelemetry's to fail on
            return _EMPTY

    # --- almanet.observer.Observer ---------------------------------------------------------------------------

    async def call(self, kind: str, uri: str, send: Callable[[Sending], Awaitable[T]]) -> T:
        span = self._tracer.start_span(
            uri,
            kind=SpanKind.CLIENT,
            attributes={"rpc.system.name": SYSTEM, "rpc.method": uri, "almanet.call.kind": kind},
        )
        in_flight = self._calls_in_flight
        in_flight[uri] = in_flight.get(uri, 0) + 1
        started = default_timer()
        status = "ok"
        try:
            result = await send(self._sending(span))
            if kind == "multicall" and span.is_recording() and isinstance(result, list):
                span.set_attribute("almanet.multicall.replies", len(result))
        except BaseException as error:
            status = _record_error(span, error)
            if isinstance(error, NoResponders):
                self._no_responders.add(1, {"rpc.method": uri})
            elif isinstance(error, CallTimeout):
                self._timeouts.add(1, {"rpc.method": uri})
            raise
        finally:
            in_flight[uri] -= 1
            if span.is_recording():
                span.set_attribute("rpc.response.status_code", status)
            span.end()
            self.client_duration.record(default_timer() - started, self.outcome_attributes(uri, status))
        return result

    def delayed_call(self, uri: str, send: Callable[[Sending], asyncio.Future[bytes]]) -> asyncio.Future[bytes]:
        span = self._tracer.start_span(
            uri,
            kind=SpanKind.CLIENT,
            attributes={"rpc.system.name": SYSTEM, "rpc.method": uri, "almanet.call.kind": "delay_call"},
        )
        return self._published(span, send, None)

    def produce(
        self, topic: str, count: int, send: Callable[[Sending], asyncio.Future[bytes]]
    ) -> asyncio.Future[bytes]:
        attributes: dict[str, Any] = {
            "messaging.system": MESSAGING_SYSTEM,
            "messaging.destination.name": topic,
            "messaging.operation.name": "publish",
            "messaging.operation.type": "send",
        }
        if count != 1:
            attributes["messaging.batch.message_count"] = count
        span = self._tracer.start_span(f"publish {topic}", kind=SpanKind.PRODUCER, attributes=attributes)
        return self._published(span, send, (topic, count))

    def _published(
        self, span: Span, send: Callable[[Sending], asyncio.Future[bytes]], produced: tuple[str, int] | None
    ) -> asyncio.Future[bytes]:
        """``send``'s publish, its span ended (and a produce's messages counted) once nsqd answered."""
        started = default_timer()
        try:
            sending = self._sending(span)
            if produced is not None and not self._trace_produced:
                sending.headers = None
            answer = send(sending)
        except BaseException as error:
            self._publish_ended(span, started, produced, error)
            raise
        answer.add_done_callback(functools.partial(self._answered, span, started, produced))
        return answer

    def _answered(
        self, span: Span, started: float, produced: tuple[str, int] | None, answer: asyncio.Future[bytes]
    ) -> None:
        self._publish_ended(
            span, started, produced, asyncio.CancelledError() if answer.cancelled() else answer.exception()
        )

    def _publish_ended(
        self, span: Span, started: float, produced: tuple[str, int] | None, error: BaseException | None
    ) -> None:
        attributes: dict[str, Any] = {}
        if error is not None:
            attributes["error.type"] = _record_error(span, error)
        span.end()
        if produced is not None:
            topic, count = produced
            attributes.update(
                {
                    "messaging.system": MESSAGING_SYSTEM,
                    "messaging.destination.name": topic,
                    "messaging.operation.name": "publish",
                }
            )
            self._sent.add(count, attributes)
            self.publish_duration.record(default_timer() - started, attributes)

    def invoked(
        self,
        uri: str,
        channel: str,
        headers: dict[str, Any] | None,
        nsqd: str,
        size: int,
        attempts: int,
        message_id: bytes,
    ) -> Invoked:
        attributes = {
            "rpc.system.name": SYSTEM,
            "rpc.method": uri,
            "messaging.consumer.group.name": channel,
            "messaging.message.id": message_id.decode("ascii", "replace"),
            "messaging.message.body.size": size,
            "messaging.nsq.message.attempts": attempts,
            **_nsqd_attributes(nsqd),
        }
        if attempts > 1:
            self._redeliveries.add(1, {"messaging.destination.name": uri, "messaging.consumer.group.name": channel})
        received = self._received(headers)
        span = self._tracer.start_span(uri, received, SpanKind.SERVER, attributes)
        return _Invocation(self, span, received, uri)

    def consumed(
        self,
        topic: str,
        channel: str,
        headers: dict[str, Any] | None,
        nsqd: str,
        size: int,
        attempts: int,
        message_id: bytes,
    ) -> Consumed:
        attributes = {
            "messaging.system": MESSAGING_SYSTEM,
            "messaging.destination.name": topic,
            "messaging.consumer.group.name": channel,
            "messaging.operation.name": "process",
        }
        span = self._tracer.start_span(
            f"process {topic}",
            self._received(headers),
            SpanKind.CONSUMER,
            {
                **attributes,
                "messaging.operation.type": "process",
                "messaging.message.id": message_id.decode("ascii", "replace"),
                "messaging.message.body.size": size,
                "messaging.nsq.message.attempts": attempts,
                **_nsqd_attributes(nsqd),
            },
        )
        self._consumed.add(1, attributes)
        if attempts > 1:
            self._redeliveries.add(1, {"messaging.destination.name": topic, "messaging.consumer.group.name": channel})
        return _Consumption(self, span, attributes)

    def reconnected(self, nsqd: str) -> None:
        self._reconnects.add(1, _nsqd_attributes(nsqd))
