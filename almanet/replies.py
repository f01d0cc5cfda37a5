"""A service's replies: published to the caller's reply topic through the nsqd the invocation came from.

Small replies go through the connection the invocation came by, in the
loop iteration's write with its FIN; the replies to invocations that came in
a batch, to one reply topic, are joined into batches as they leave. Replies
over ``APART_SIZE`` go apart, through a producer of their own to that nsqd:
nsqd closes the connection that sent a message over its --max-msg-size, and
the invocations in flight on it would be handed out again. A reply nsqd
refuses as too big is answered with an ``InternalError`` saying so.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from almanet._speedups.envelope import encode_reply
from almanet.errors import InternalError
from almanet.nsq import ConnectionOptions, Message, MessagePart, Producer
from almanet.nsq.connection import OnAnswer
from almanet.rpc import APART_SIZE, join_envelopes, reply_envelope
from almanet.wire.errors import ConnectionFailed, MessageTooBig

logger = logging.getLogger("almanet")


class _ReplyPublished:
    """Told nsqd's answer to the publish of a reply from ``uri``: a failure is logged (the caller will time out)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri

    def answered(self, answer: bytes) -> None:
        pass

    def failed(self, error: BaseException) -> None:
        logger.error("%s: a reply could not be published (its caller will time out): %s", self.uri, error)


class _BigReplyPublished(_ReplyPublished):
    """Told nsqd's answer to a big reply's publish: one nsqd refuses as too big is answered with an error."""

    def __init__(self, replies: Replies, uri: str, invocation: Message, reply_to: str, call_id: int) -> None:
        super().__init__(uri)
        self.replies = replies
        self.invocation = invocation  # the error reply goes back the way a small reply would
        self.reply_to = reply_to
        self.call_id = call_id

    def failed(self, error: BaseException) -> None:
        if isinstance(error, MessageTooBig):
            self.replies.too_big(self.invocation, self.uri, self.reply_to, self.call_id, error)
        else:
            super().failed(error)


class Replies:
    """Publishes a service's replies (see the module); ``open()`` before the first, ``close()`` after the last."""

    def __init__(self) -> None:
        # By the address of the nsqd they publish to; None while closed.
        self._big_reply_producers: dict[str, Producer] | None = None
        self.options = ConnectionOptions()  # of the producers, set by the service
        # What a reply's publish tells its failure to, by URI: one each, not one a reply.
        self._published: dict[str, _ReplyPublished] = {}

    def know(self, uri: str) -> None:
        """Replies will be sent from ``uri``."""
        self._published.setdefault(uri, _ReplyPublished(uri))

    def open(self, options: ConnectionOptions) -> None:
        self.options = options
        self._big_reply_producers = {}

    async def close(self, timeout: float) -> None:
        producers, self._big_reply_producers = self._big_reply_producers or {}, None
        await asyncio.gather(*(producer.close(timeout) for producer in producers.values()))

    def send(self, message: Message, uri: str, reply_to: str, call_id: int, ok: bool, payload: Any) -> None:
        """Publish a reply to ``reply_to``, which the caller checked is a session's reply topic (``is_reply_topic``)."""
        try:
            body = reply_envelope(call_id, ok, payload)
        except TypeError as error:
            logger.error("%s: the result of call %d cannot be sent: %s", uri, call_id, error)
            unencodable = InternalError(f"the result cannot be encoded: {error}")
            body = encode_reply(call_id, False, unencodable.to_reply_payload())
        try:
            if len(body) > APART_SIZE:
                self._publish_apart(message, reply_to, body, _BigReplyPublished(self, uri, message, reply_to, call_id))
            else:
                # The caller of an invocation that came in a batch takes its reply in one too.
                join = join_envelopes if type(message) is MessagePart else None
                message.publish(reply_to, body, self._published.get(uri) or _ReplyPublished(uri), join)
        except MessageTooBig as error:
            self.too_big(message, uri, reply_to, call_id, error)
        except (ValueError, TypeError) as error:  # a reply topic no nsqd takes
            logger.warning("%s: cannot reply to %r: %s", uri, reply_to, error)

    def too_big(self, invocation: Message, uri: str, reply_to: str, call_id: int, error: MessageTooBig) -> None:
        logger.error("%s: the reply to call %d is too big to send: %s", uri, call_id, error)
        published = self._published.get(uri) or _ReplyPublished(uri)
        too_big = InternalError(f"the reply is too big to send: {error}").to_reply_payload()
        reply = encode_reply(call_id, False, too_big)
        if invocation.connection_open:
            invocation.publish(reply_to, reply, published)
        else:
            self._publish_apart(invocation, reply_to, reply, published)

    def _publish_apart(self, invocation: Message, reply_to: str, body: bytes, answer: OnAnswer) -> None:
        """Publish a reply apart from the replies in flight (as a session publishes big calls), to the nsqd
        ``invocation`` came from: on a cluster, the caller reads its replies there only."""
        if self._big_reply_producers is None:  # a call that ended after stop() closed the producers
            answer.failed(ConnectionFailed("the service stopped before the reply was sent"))
            return
        address = invocation.connection.address
        producer = self._big_reply_producers.get(address)
        if producer is None:
            producer = self._big_reply_producers[address] = Producer(address, options=self.options)
        producer.publish_with(answer, reply_to, body)
