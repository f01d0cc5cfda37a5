"""Consumes a topic: ``python examples/consumer.py [COUNT]`` (ALMANET_ADDRESSES as for the microservice).

Commits each message, but rolls the first order back once: it comes back
with its attempts counted.
"""

import asyncio
import os
import sys

import almanet

TOPIC = "net.example.orders"


async def main(count: int) -> None:
    async with almanet.new_session(*os.environ.get("ALMANET_ADDRESSES", "127.0.0.1:4150").split(",")) as session:
        committed = 0
        async with session.consume(TOPIC, "kitchen") as messages:
            async for message in messages:
                order = message.payload
                if order["order"] == 0 and message.attempts == 1:
                    print(f"consumer: order {order['order']} rolled back (attempt {message.attempts})")
                    message.rollback(delay=0.1)
                    continue
                message.commit()
                committed += 1
                print(f"consumer: order {order['order']} committed (attempt {message.attempts})")
                if committed == count:
                    break


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 5))
