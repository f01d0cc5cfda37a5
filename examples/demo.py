"""The main job of `make demo`: almanet's RPC and produce/consume on the embedded broker.

It starts the embedded NSQ-compatible broker on free loopback ports, serves
examples/microservice.py with `almanet serve`, runs examples/caller.py and
`almanet call` against it, then examples/producer.py and
examples/consumer.py, stops the service with SIGTERM (it finishes what is in
flight) and prints the broker's view of the topics.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import urllib.request
from pathlib import Path

import almanet
from almanet.broker import Broker

PROJECT = Path(__file__).resolve().parent.parent


async def run(*command: str, env: dict[str, str], label: str) -> None:
    """Run a command to its end, printing its output under ``label``."""
    process = await asyncio.create_subprocess_exec(
        *command, env=env, cwd=PROJECT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    for line in output.decode().splitlines():
        print(f"  [{label}] {line}")
    if process.returncode:
        raise SystemExit(f"{label} failed with exit code {process.returncode}")


async def until_served(broker: Broker, topic: str, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while topic not in broker.topics or not broker.topics[topic].channels:
        if loop.time() > deadline:
            raise SystemExit(f"nothing serves {topic} after {timeout} s")
        await asyncio.sleep(0.05)


async def main() -> None:
    print(f"almanet {almanet.__version__}: speedups {almanet.speedups()}")
    async with Broker(tcp_address="127.0.0.1:0", http_address="127.0.0.1:0") as broker:
        print(f"broker: TCP {broker.tcp_address}, HTTP {broker.http_address}")
        env = dict(os.environ, ALMANET_ADDRESSES=broker.tcp_address)
        almanet_command = [sys.executable, "-m", "almanet"]

        print("service: almanet serve examples.microservice:service")
        service = await asyncio.create_subprocess_exec(
            *almanet_command, "serve", "examples.microservice:service", "--log-level=warn", env=env, cwd=PROJECT
        )
        try:
            await until_served(broker, "net.example.greeting")
            print("caller: examples/caller.py")
            await run(sys.executable, "examples/caller.py", env=env, label="caller")
            print("""command line: almanet call net.example.greeting '"Demo"'""")
            await run(
                *almanet_command, "call", "net.example.greeting", '"Demo"', "--address", broker.tcp_address,
                env=env, label="almanet call",
            )  # fmt: skip
            print("produce and consume: examples/producer.py, then examples/consumer.py")
            await run(sys.executable, "examples/producer.py", "3", env=env, label="producer")
            await run(sys.executable, "examples/consumer.py", "3", env=env, label="consumer")
        finally:
            service.send_signal(signal.SIGTERM)
            print(f"service: stopped on SIGTERM, exit code {await service.wait()}")

        url = f"http://{broker.http_address}/stats?format=json"
        stats = await asyncio.to_thread(lambda: json.load(urllib.request.urlopen(url, timeout=5)))
        for topic in stats["topics"]:
            for channel in topic["channels"]:
                print(
                    f"/stats {topic['topic_name']}/{channel['channel_name']}: messages {channel['message_count']}, "
                    f"requeued {channel['requeue_count']}, in flight {channel['in_flight_count']}, "
                    f"depth {channel['depth']}"
                )


if __name__ == "__main__":
    asyncio.run(main())
