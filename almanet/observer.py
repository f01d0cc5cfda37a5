"""The observer almanet tells what it does: calls, invocations, produced and consumed messages, reconnections.

``current`` is None unless an application installs one (``almanet.otel``'s
``AlmanetInstrumentor`` does, for OpenTelemetry): until then each hot path
pays one read of it and a comparison, and nothing else. The observer makes
the trace context that invocations and produced messages carry in their
headers (``Sending.headers``), and takes it from those it receives.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Sending(Protocol):
    """An invocation or a produced message being sent: what its headers carry, told what went and where."""

    @property
    def headers(self) -> dict[str, str] | None: ...

    def sent(self, size: int, nsqd: str | None) -> None:
        """The body's ``size`` in bytes went to the nsqd at ``nsqd`` (None: not connected yet)."""


class Invoked(Protocol):
    """An invocation a procedure runs, from its receipt to its answer."""

    def enter(self) -> object:
        """Made current while the procedure starts (so its task or thread inherits it); what ``leave`` takes."""

    def leave(self, entered: object) -> None: ...

    def raised(self, error: BaseException) -> None:
        """The procedure raised ``error`` (its answer follows)."""

    def answered(self, ok: bool, payload: Any) -> None:
        """Answered: ok with the result, or not with the error payload ``[name, args, payload]``."""


class Consumed(Protocol):
    """A consumed message, from its receipt to its commit or rollback."""

    def answered(self, committed: bool) -> None: ...


class Observer(Protocol):
    def call(self, kind: str, uri: str, send: Callable[[Sending], Awaitable[T]]) -> Awaitable[T]:
        """A call (``kind`` "call" or "multicall") to ``uri``: ``send`` makes it, with the headers given."""

    def delayed_call(self, uri: str, send: Callable[[Sending], asyncio.Future[bytes]]) -> asyncio.Future[bytes]:
        """A deferred call to ``uri``: ``send`` publishes it; the future is nsqd's answer."""

    def produce(
        self, topic: str, count: int, send: Callable[[Sending], asyncio.Future[bytes]]
    ) -> asyncio.Future[bytes]:
        """``count`` messages produced to ``topic`` in one publish: ``send`` publishes them."""

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
        """An invocation of ``uri`` received through ``channel`` from the nsqd at ``nsqd``, about to run."""

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
        """A message of ``topic`` received through ``channel`` by a subscription."""

    def reconnected(self, nsqd: str) -> None:
        """A connection lost to the nsqd at ``nsqd`` is open again."""


current: Observer | None = None


def install(new: Observer | None) -> None:
    """Make ``new`` the observer (None: none)."""
    global current
    current = new
