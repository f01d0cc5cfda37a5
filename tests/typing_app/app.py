"""A small typical application: a service with typed procedures, a caller, a producer and a consumer.

``mypy --strict`` passes on it (tests/test_typing.py), and it runs on each test broker.
"""

import asyncio
import dataclasses
import sys
from typing import Any

import almanet


@dataclasses.dataclass
class Order:
    item: str
    count: int = 1


@dataclasses.dataclass
class Receipt:
    total: int
    note: str | None = None


class OutOfStock(almanet.rpc_error):
    name = "shop.OutOfStock"


service = almanet.new_service("127.0.0.1:4150", prefix="shop", timeout=10.0, heartbeat_interval=10.0)


@service.procedure(raises=(OutOfStock,))
async def buy(payload: Order, session: almanet.Session) -> Receipt:
    """Three a piece; tea is out of stock."""
    if payload.item == "tea":
        raise OutOfStock(payload.item, payload={"restock": "monday"})
    return Receipt(payload.count * 3)


@service.procedure(name="total", max_concurrency=8, msg_timeout=60.0)
def total(payload: list[int]) -> int:
    return sum(payload)


async def call(session: almanet.Session) -> list[str]:
    """The caller: what it got, line by line."""
    receipt: Receipt = (await session.call(buy, Order("milk", 2))).payload
    summed: int = (await session.call(total, [1, 2, 3], timeout=5.0)).payload
    raw: Any = (await session.call("shop.total", [4, 5])).payload
    lines = [f"receipt {receipt.total} {receipt.note}", f"total {summed}", f"raw {raw}"]
    try:
        await session.call(buy, Order("tea"))
    except OutOfStock as error:
        lines.append(f"{error.name} {error.payload}")
    replies = await session.multicall(total, [1], timeout=0.5, count=1)
    lines.extend(f"multicall {reply.payload}" for reply in replies if isinstance(reply, almanet.Reply))
    return lines


async def produce(session: almanet.Session, topic: str) -> None:
    """The producer: one order, then a batch."""
    await session.produce(topic, {"order": 1})
    await session.produce_batch(topic, [{"order": 2}, {"order": 3}])


async def consume(session: almanet.Session, topic: str, count: int) -> list[str]:
    """The consumer: ``count`` messages, each committed."""
    lines: list[str] = []
    async with session.consume(topic, "kitchen", max_in_flight=10) as messages:
        async for message in messages:
            order: dict[str, int] = message.payload
            lines.append(f"order {order['order']} (attempt {message.attempts})")
            message.commit()
            if len(lines) == count:
                break
    return lines


async def main(address: str, topic: str = "shop.orders") -> list[str]:
    service.use_addresses(address)
    session = almanet.new_session(address, timeout=10.0)
    async with service, session:
        lines = await call(session)
        await produce(session, topic)
        lines += await consume(session, topic, 3)
    return lines


if __name__ == "__main__":
    for line in asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:4150")):
        print(line)
