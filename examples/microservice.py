"""A microservice: ``python examples/microservice.py`` (or ``almanet serve examples.microservice:service``).

Its addresses come from ALMANET_ADDRESSES, comma-separated, as for ``almanet serve`` (default 127.0.0.1:4150).
"""

import asyncio
import os

import almanet

service = almanet.new_service(*os.environ.get("ALMANET_ADDRESSES", "127.0.0.1:4150").split(","), prefix="net.example")


class denied(almanet.rpc_error):
    """Custom RPC exception"""


@service.procedure
async def greeting(payload: str, **kwargs) -> str:
    """Procedure that returns greeting message"""
    if payload == "guest":
        # you can raise custom exceptions and the caller will have an error
        raise denied()
    return f"Hello, {payload}!"


@service.procedure(name="slow_echo")
async def slow_echo(payload: float, **kwargs) -> float:
    """Answers with its payload after that many seconds."""
    await asyncio.sleep(payload)
    return payload


if __name__ == "__main__":
    service.serve()
