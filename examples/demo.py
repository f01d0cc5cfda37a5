"""The main job of `make demo`.

It starts the embedded NSQ-compatible broker on free loopback ports, then a
consumer and a publisher that speak NSQ protocol V2 through almanet's frame
codec: the consumer subscribes, the publisher sends PUB, MPUB and DPUB, and
the consumer commits (FIN) each message but rolls one back once (REQ), which
brings it back with its attempts counted. Finally the broker's /stats.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import almanet
from almanet._speedups import frames
from almanet.broker import Broker
from almanet.nsq.protocol import MAGIC_V2

TOPIC = "net.example.greetings"


async def read_frames(reader: asyncio.StreamReader, frame_reader: frames.FrameReader) -> list[frames.Frame]:
    frame_reader.feed(await reader.read(65536))
    return list(frame_reader)


async def main() -> None:
    print(f"almanet {almanet.__version__}: speedups {almanet.speedups()}")
    async with Broker(tcp_address="127.0.0.1:0", http_address="127.0.0.1:0") as broker:
        print(f"broker: TCP {broker.tcp_address}, HTTP {broker.http_address}")
        host, port = broker.tcp_address.rsplit(":", 1)

        consumer_in, consumer_out = await asyncio.open_connection(host, int(port))
        consumer_out.write(MAGIC_V2 + frames.encode_sub(TOPIC, "demo") + frames.encode_rdy(10))
        publisher_in, publisher_out = await asyncio.open_connection(host, int(port))
        publisher_out.write(
            MAGIC_V2
            + frames.encode_pub(TOPIC, b"Hello, Aidar!")
            + frames.encode_mpub(TOPIC, [b"Hello, Alice!", b"Hello, Bob!"])
            + frames.encode_dpub(TOPIC, 300, b"Hello, later!")
        )
        started = time.monotonic()
        publisher_frames = frames.FrameReader()
        acknowledged = 0
        while acknowledged < 3:
            acknowledged += len(await read_frames(publisher_in, publisher_frames))
        print("publisher: PUB, MPUB and DPUB (300 ms) each answered OK")

        consumer_frames = frames.FrameReader()
        committed = 0
        rolled_back = False
        while committed < 4:
            for frame in await read_frames(consumer_in, consumer_frames):
                if not isinstance(frame, frames.MessageFrame):
                    continue
                elapsed = (time.monotonic() - started) * 1000
                print(f"consumer: {frame.body.decode()!r} attempts={frame.attempts} at {elapsed:.0f} ms")
                if frame.body == b"Hello, Bob!" and not rolled_back:
                    consumer_out.write(frames.encode_req(frame.id, 100))
                    rolled_back = True
                    print("consumer:   rolled back (REQ, 100 ms)")
                else:
                    consumer_out.write(frames.encode_fin(frame.id))
                    committed += 1

        await asyncio.sleep(0.05)  # let the last FIN arrive before reading the stats
        url = f"http://{broker.http_address}/stats?format=json&topic={TOPIC}"
        stats = await asyncio.to_thread(lambda: json.load(urllib.request.urlopen(url, timeout=5)))
        channel = stats["topics"][0]["channels"][0]
        print(
            f"/stats {TOPIC}/{channel['channel_name']}: messages {channel['message_count']}, "
            f"requeued {channel['requeue_count']}, in flight {channel['in_flight_count']}, depth {channel['depth']}"
        )
        for writer in (consumer_out, publisher_out):
            writer.close()


if __name__ == "__main__":
    asyncio.run(main())
