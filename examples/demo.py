"""The main job of `make demo`.

For now it shows which implementation of the hot paths is active and sends a
few commands and frames through the NSQ codec: a client's commands parsed as
the embedded broker parses them, and the broker's frames read back as the
client reads them.
"""

import time

import almanet
from almanet._speedups import frames
from almanet.nsq.protocol import MAGIC_V2, OK


def main() -> None:
    print(f"almanet {almanet.__version__}: speedups {almanet.speedups()}")

    client_bytes = MAGIC_V2 + b"".join(
        [
            frames.encode_identify({"client_id": "demo", "feature_negotiation": True}),
            frames.encode_sub("net.example.greeting", "service"),
            frames.encode_rdy(1),
            frames.encode_pub("net.example.greeting", b"Aidar"),
            frames.encode_mpub("net.example.greeting", [b"Alice", b"Bob"]),
        ]
    )
    parser = frames.CommandParser()
    # Fed a byte at a time: the parser is incremental, as on a real socket.
    for byte in client_bytes:
        parser.feed(bytes([byte]))
        for command in parser:
            print(f"  client -> broker  {command}")

    broker_bytes = b"".join(
        [
            frames.encode_response(OK),
            frames.encode_message(time.time_ns(), 1, b"0123456789abcdef", b"Hello, Aidar!"),
            frames.encode_error(b"E_FIN_FAILED FIN 0123456789abcdef failed ID not in flight"),
        ]
    )
    reader = frames.FrameReader()
    reader.feed(broker_bytes)
    for frame in reader:
        print(f"  broker -> client  {frame}")


if __name__ == "__main__":
    main()
