"""Calls the microservice: ``python examples/caller.py`` (ALMANET_ADDRESSES as for the microservice)."""

import asyncio
import os

import almanet

session = almanet.new_session(*os.environ.get("ALMANET_ADDRESSES", "127.0.0.1:4150").split(","))


async def main() -> None:
    async with session:
        # Calling the `net.example.greeting` procedure with 'Aidar' payload.
        # Raises `TimeoutError` if procedure not found or request timed out.
        result = await session.call("net.example.greeting", "Aidar")
        print("net.example.greeting('Aidar'):", result.payload)

        try:
            await session.call("net.example.greeting", "guest")
        except almanet.rpc_error as e:
            print("during call net.example.greeting('guest'):", e)

        try:
            await session.call("net.example.missing", "anyone")
        except almanet.NoResponders as e:  # within 0.75 s: nothing serves it
            print("net.example.missing:", e)


if __name__ == "__main__":
    asyncio.run(main())
