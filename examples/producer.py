"""Produces messages to a topic: ``python examples/producer.py [COUNT]`` (ALMANET_ADDRESSES as for the microservice)."""

import asyncio
import os
import sys

import almanet

TOPIC = "net.example.orders"


async def main(count: int) -> None:
    async with almanet.new_session(*os.environ.get("ALMANET_ADDRESSES", "127.0.0.1:4150").split(",")) as session:
        # Individual produce calls of one loop iteration leave as one MPUB.
        await asyncio.gather(*(session.produce(TOPIC, {"order": number, "item": "tea"}) for number in range(count)))
        print(f"producer: {count} orders produced to {TOPIC}")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 5))
