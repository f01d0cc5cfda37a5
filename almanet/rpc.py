"""The RPC protocol both ends speak: URIs, reply and discovery topics, invocation envelopes.

A session (the caller, ``almanet.session``) publishes an invocation envelope
to the topic named by the procedure's URI; a service (the callee,
``almanet.service``) reads it through its channel and publishes the reply
envelope to the caller's reply topic, ``_almanet.reply.<id>#ephemeral``.
Before calling a URI not known to be served, a caller asks on the discovery
topic. docs/PROTOCOL.md describes it all, bytes included.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Protocol

from almanet import conversion
from almanet._speedups.envelope import encode_batch, encode_invocation, encode_reply
from almanet._speedups.frames import is_valid_name
from almanet.wire.protocol import EPHEMERAL_SUFFIX

REPLY_TOPIC_PREFIX = "_almanet.reply."
_REPLY_TOPIC = re.compile(r"_almanet\.reply\.[0-9a-f]{16}#ephemeral")


@functools.lru_cache(maxsize=4096)
def is_reply_topic(topic: str) -> bool:
    """Whether ``topic`` is a session's reply topic: the only topics a service publishes replies to."""
    return _REPLY_TOPIC.fullmatch(topic) is not None


def reply_topic(session_id: str) -> str:
    """The reply topic of the session ``session_id`` (16 hex digits)."""
    return f"{REPLY_TOPIC_PREFIX}{session_id}#ephemeral"


class NamedProcedure(Protocol):
    """What a call may name instead of a URI: a ``Procedure`` a service registered (the service is the floor above)."""

    @property
    def uri(self) -> str: ...


REPLY_CHANNEL = "reply#ephemeral"
DEFAULT_TIMEOUT = 60.0

# Invocations and replies bigger than this go through a producer, apart from
# the connection that carries a session's calls and replies (or a service's
# invocations and replies) and their FINs: nsqd closes the connection that
# sent a message over its --max-msg-size, and what is in flight on it would
# go with it. nsqd does not tell its limit (1 MiB by default): this assumes
# no nsqd runs with less than 4 KiB.
APART_SIZE = 4 * 1024

# Invocations to one URI made in one loop iteration travel as one NSQ message,
# a batch envelope, when every instance serving the URI said in its discovery
# answer that it takes batches (SERVICE_FEATURES); the replies to the
# invocations of a batch, finished in one loop iteration, go back to their
# reply topic likewise. nsqd's work is by message, not by call: a batch of n
# calls costs it about what one call does. A batch holds at most BATCH_ITEMS
# envelopes (so that calls in flight still spread over the instances) and
# BATCH_SIZE bytes (what every nsqd takes, as APART_SIZE). A lone call goes
# at once and alone: nothing waits to be batched.
BATCH_ITEMS = 32
BATCH_SIZE = APART_SIZE
# A batch's array header and item count, at most; each item adds its bin header.
_BATCH_OVERHEAD = 3 + 3
# What a service answers a discovery query with: the forms it takes besides an invocation a message.
SERVICE_FEATURES = {"batch": True}

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


def takes_batches(discovery_answer: Any) -> bool:
    """Whether the payload of a service's discovery answer says it takes batches (``SERVICE_FEATURES``)."""
    return type(discovery_answer) is dict and discovery_answer.get("batch") is True


def join_envelopes(bodies: list[bytes], max_msg_size: int) -> list[bytes]:
    """``bodies`` (envelopes) joined, in order, into batch envelopes within ``BATCH_ITEMS`` and the size limits.

    A body that shares its batch with no other goes as it is. For
    ``almanet.nsq.Connection.publish``'s ``join``.
    """
    limit = min(max_msg_size, BATCH_SIZE)
    joined: list[bytes] = []
    group: list[bytes] = []
    size = _BATCH_OVERHEAD
    for body in bodies:
        item_size = len(body) + (2 if len(body) <= 0xFF else 3)
        if group and (len(group) == BATCH_ITEMS or size + item_size > limit):
            joined.append(group[0] if len(group) == 1 else encode_batch(group))
            group, size = [], _BATCH_OVERHEAD
        group.append(body)
        size += item_size
    joined.append(group[0] if len(group) == 1 else encode_batch(group))
    return joined


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


def invocation_envelope(
    call_id: int, reply_to: str | None, deadline: int, headers: dict[str, Any] | None, payload: Any
) -> bytes:
    """The invocation's envelope; a payload the envelope cannot encode (a dataclass, an enum...) is sent as builtins."""
    try:
        return encode_invocation(call_id, reply_to, deadline, headers, payload)
    except TypeError as refused:
        encode = functools.partial(encode_invocation, call_id, reply_to, deadline, headers)
        return conversion.encode_as_builtins(encode, payload, refused)


def reply_envelope(call_id: int, ok: bool, payload: Any) -> bytes:
    """The reply's envelope; a payload the envelope cannot encode (a dataclass, an enum...) is sent as builtins."""
    try:
        return encode_reply(call_id, ok, payload)
    except TypeError as refused:
        return conversion.encode_as_builtins(functools.partial(encode_reply, call_id, ok), payload, refused)
