"""The RPC baseline: how the original design did RPC, to measure almanet against.

ansq for the transport, a JSON envelope, a dict of one future per call id,
and a task per reply read from ansq's message iterator. Needs ``ansq``
(the ``bench`` extra).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
from typing import Any

import ansq

REPLY_CHANNEL = "reply#ephemeral"


def _options() -> Any:
    return ansq.ConnectionOptions(auto_reconnect=False)


class BaselineCaller:
    """Calls ``topic`` with JSON invocations; replies come back on a reply topic of its own."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.reply_topic = f"baseline.reply.{secrets.token_hex(8)}#ephemeral"
        self._futures: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)

    async def __aenter__(self) -> BaselineCaller:
        self._writer = await ansq.create_writer([self.address], connection_options=_options())
        self._reader = await ansq.create_reader(
            self.reply_topic, REPLY_CHANNEL, nsqd_tcp_addresses=[self.address], connection_options=_options()
        )
        for connection in self._reader.connections:
            await connection.rdy(2500)
        self._reading = asyncio.ensure_future(self._read_replies())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._reading.cancel()
        await asyncio.gather(self._reading, return_exceptions=True)
        await self._reader.close()
        await self._writer.close()

    async def call(self, topic: str, payload: Any, timeout: float = 30.0) -> Any:
        call_id = next(self._ids)
        future = self._futures[call_id] = asyncio.get_running_loop().create_future()
        try:
            body = json.dumps({"id": call_id, "reply_to": self.reply_topic, "payload": payload})
            await self._writer.pub(topic, body)
            return await asyncio.wait_for(future, timeout)
        finally:
            self._futures.pop(call_id, None)

    async def _read_replies(self) -> None:
        async for message in self._reader.messages():
            reply = json.loads(message.body)
            await message.fin()
            future = self._futures.get(reply["id"])
            if future is not None and not future.done():
                future.set_result(reply["payload"])


async def serve(address: str, topic: str, ready: asyncio.Event, stop: asyncio.Event) -> None:
    """Answer every invocation on ``topic`` with its payload, until ``stop`` is set."""
    reader = await ansq.create_reader(topic, "rpc", nsqd_tcp_addresses=[address], connection_options=_options())
    writer = await ansq.create_writer([address], connection_options=_options())
    for connection in reader.connections:
        await connection.rdy(2500)

    async def answer(message: Any) -> None:
        invocation = json.loads(message.body)
        body = json.dumps({"id": invocation["id"], "payload": invocation["payload"]})
        await writer.pub(invocation["reply_to"], body)
        await message.fin()

    answering: set[asyncio.Future[None]] = set()

    async def read() -> None:
        async for message in reader.messages():
            task = asyncio.ensure_future(answer(message))
            answering.add(task)
            task.add_done_callback(answering.discard)

    reading = asyncio.ensure_future(read())
    ready.set()
    await stop.wait()
    reading.cancel()
    await asyncio.gather(reading, return_exceptions=True)
    await reader.close()
    await writer.close()
