"""Hostile clients: random mixes of valid commands and garbage never break the broker.

Each example starts a broker, lets three clients send interleaved streams of
valid commands, malformed commands and random bytes in random chunkings,
then checks that the broker logged no unexpected exception and still relays
a message between two fresh clients.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rawnsq import RawConnection

from almanet._speedups.frames import (
    ResponseFrame,
    encode_dpub,
    encode_fin,
    encode_identify,
    encode_mpub,
    encode_pub,
    encode_rdy,
    encode_req,
    encode_sub,
    encode_touch,
)
from almanet.broker import Broker
from almanet.wire.protocol import CLS, MAGIC_V2, NOP, OK

names = st.sampled_from(["t", "t#ephemeral", "other"])
channels = st.sampled_from(["c", "c#ephemeral", "d"])
ids = st.sampled_from([b"0000000000000001", b"0000000000000002", b"0000000000000003", b"ffffffffffffffff"])
bodies = st.binary(min_size=1, max_size=64)

valid_commands = st.one_of(
    st.builds(encode_pub, names, bodies),
    st.builds(encode_mpub, names, st.lists(bodies, min_size=1, max_size=5)),
    st.builds(encode_dpub, names, st.integers(0, 50), bodies),
    st.builds(encode_sub, names, channels),
    st.builds(encode_rdy, st.integers(0, 3000)),
    st.builds(encode_fin, ids),
    st.builds(encode_req, ids, st.integers(0, 50)),
    st.builds(encode_touch, ids),
    st.builds(encode_identify, st.fixed_dictionaries({}, optional={"heartbeat_interval": st.integers(-2, 70000)})),
    st.sampled_from([NOP, CLS, b"AUTH\n\x00\x00\x00\x01x"]),
)
malformed_commands = st.one_of(
    st.binary(max_size=40),
    st.builds(lambda line: line + b"\n", st.binary(max_size=40).filter(lambda raw: b"\n" not in raw)),
    st.sampled_from(
        [b"PUB t\n\xff\xff\xff\xff", b"MPUB t\n\x00\x00\x00\x08\x00\x00\x00\x05", b"IDENTIFY\n\x00\x00\x00\x02{]"]
    ),
)
# Anything after a fatal command is never read: a stream is a likely session
# (mostly subscribed first), valid commands, then maybe one malformed command.
subscribed = st.builds(
    lambda sub, rdy: sub + rdy, st.builds(encode_sub, names, channels), st.builds(encode_rdy, st.integers(1, 5))
)
streams = st.builds(
    lambda prefix, commands, tail: MAGIC_V2 + prefix + b"".join(commands) + tail,
    st.one_of(subscribed, st.just(b"")),
    st.lists(valid_commands, max_size=10),
    st.one_of(malformed_commands, st.just(b"")),
)
chunk_sizes = st.lists(st.integers(1, 64), min_size=1, max_size=8)


async def send_in_chunks(address: str, stream: bytes, sizes: list[int]) -> None:
    host, _, port = address.rpartition(":")
    _reader, writer = await asyncio.open_connection(host, int(port))
    position = 0
    for size in sizes * (len(stream) // sum(sizes) + 1):
        if position >= len(stream):
            break
        writer.write(stream[position : position + size])
        position += size
        await asyncio.sleep(0)
    await asyncio.sleep(0.005)
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def scenario(clients: list[tuple[bytes, list[int]]]) -> list[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    async with Broker(tcp_address="127.0.0.1:0", http_address="127.0.0.1:0") as broker:
        await asyncio.gather(*(send_in_chunks(broker.tcp_address, stream, sizes) for stream, sizes in clients))
        consumer = await RawConnection.consumer(broker.tcp_address, "healthy", "c")
        publisher = await RawConnection.open(broker.tcp_address)
        publisher.send(encode_pub("healthy", b"still works"))
        assert await publisher.frame() == ResponseFrame(OK)
        assert (await consumer.message()).body == b"still works"
        await consumer.close()
        await publisher.close()
    return errors


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(streams, chunk_sizes), min_size=1, max_size=3))
def test_hostile_clients_do_not_break_the_broker(clients: list[tuple[bytes, list[int]]]) -> None:
    assert asyncio.run(scenario(clients)) == []
