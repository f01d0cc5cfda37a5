"""The compiled and the pure codec see the same random and malformed bytes and must agree.

Each stream is fed in a random chunking; the outcome (frames or commands, then
the error if any) must be the same for both twins and for any chunking.
"""

import itertools
import struct
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from almanet.wire.errors import ProtocolError
from almanet.wire.protocol import MAGIC_V2
from helpers import load_twin, mutate

settings.register_profile("codec", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("codec")


def twins() -> tuple[ModuleType, ModuleType]:
    return load_twin("frames", "c"), load_twin("frames", "py")


def describe(item: Any) -> tuple[Any, ...]:
    """A twin-independent view of a frame or command."""
    kind = type(item).__name__
    if kind == "MessageFrame":
        return (kind, item.timestamp, item.attempts, item.id, item.body)
    if kind == "Command":
        return (kind, item.name, item.params, item.body, item.messages)
    return (kind, item.data)


def outcome(make: Callable[[], Any], chunks: Iterable[bytes]) -> list[tuple[Any, ...]]:
    reader = make()
    out: list[tuple[Any, ...]] = []
    try:
        for chunk in chunks:
            reader.feed(chunk)
            out.extend(describe(item) for item in reader)
        reader.feed_eof()
    except ProtocolError as error:
        out.append(("error", type(error).__name__, str(error)))
    return out


@st.composite
def chunked(draw: st.DrawFn, stream: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


def frame_reader(**options: int) -> Callable[[ModuleType], Any]:
    return lambda twin: twin.FrameReader(**options)


def command_parser(**options: int) -> Callable[[ModuleType], Any]:
    return lambda twin: twin.CommandParser(**options)


def assert_agree(build: Callable[[ModuleType], Any], stream: bytes, chunks: list[bytes]) -> None:
    compiled, pure = twins()
    expected = outcome(lambda: build(pure), [stream])
    assert outcome(lambda: build(pure), chunks) == expected
    assert outcome(lambda: build(compiled), chunks) == expected
    assert outcome(lambda: build(compiled), [stream]) == expected


# Sizes written on the wire: usually the true one, often just off it, sometimes absurd.
size_deltas = st.one_of(
    st.just(0),
    st.sampled_from([-1, 1, -4, 4, -26, -30]),
    st.integers(-(2**31), 2**31 - 1),
)


def int32(value: int) -> bytes:
    return struct.pack(">I", value & 0xFFFFFFFF)


def sized(data: bytes, delta: int) -> bytes:
    return int32(len(data) + delta) + data


# --- frames (client direction) --------------------------------------------

# Data lengths around the 26-byte message header are where a bounds check goes wrong.
frame_data = st.one_of(st.binary(max_size=60), st.integers(24, 28).flatmap(lambda n: st.binary(min_size=n, max_size=n)))
frame_items = st.builds(
    lambda kind, delta, data: sized(int32(kind) + data, delta),
    st.one_of(st.sampled_from([0, 1, 2, 2, 2]), st.integers(-(2**31), 2**31 - 1)),
    size_deltas,
    frame_data,
)


@st.composite
def frame_streams(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    stream = draw(st.one_of(st.binary(max_size=200), st.lists(frame_items, max_size=6).map(b"".join)))
    stream = mutate(draw, stream)
    return stream, draw(chunked(stream))


@given(frame_streams(), st.sampled_from([4, 29, 30, 64, 1 << 20]))
def test_frame_readers_agree(case: tuple[bytes, list[bytes]], max_frame_size: int) -> None:
    stream, chunks = case
    assert_agree(frame_reader(max_frame_size=max_frame_size), stream, chunks)


def test_frame_header_boundaries_agree() -> None:
    """Every frame type, data length and size error around the limits, exhaustively."""
    for kind in (-1, 0, 1, 2, 3):
        for length in range(32):
            for delta in (-5, -1, 0, 1):
                for max_frame_size in (4, 29, 30, 31):
                    stream = sized(int32(kind) + bytes(length), delta)
                    for chunks in ([stream], [stream[:4], stream[4:8], stream[8:]]):
                        assert_agree(frame_reader(max_frame_size=max_frame_size), stream, chunks)


# --- commands (server direction) ------------------------------------------

names = st.one_of(st.sampled_from(["t", "topic.a-b_c", "x#ephemeral"]), st.text("ab.#_-é ", min_size=0, max_size=5))
bodies = st.binary(min_size=1, max_size=20)
line_params = st.one_of(names, st.builds(lambda t, d: f"{t} {d}", names, st.sampled_from(["0", "10", "11", "x", ""])))


@st.composite
def mpub_bodies(draw: st.DrawFn) -> bytes:
    messages = draw(st.lists(st.binary(max_size=12), max_size=4))
    count = len(messages) + draw(st.sampled_from([0, 0, 0, -1, 1, -(2**31)]))
    return int32(count) + b"".join(sized(m, draw(st.sampled_from([0, 0, 0, -1, 1]))) for m in messages)


@st.composite
def commands(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["body", "mpub", "line", "raw"]))
    if kind == "body":
        verb = draw(st.sampled_from(["PUB", "DPUB", "IDENTIFY", "AUTH"]))
        params = draw(st.one_of(st.just(""), line_params.map(lambda p: " " + p)))
        return f"{verb}{params}\n".encode() + sized(draw(st.binary(max_size=20)), draw(size_deltas))
    if kind == "mpub":
        body = draw(mpub_bodies())
        return f"MPUB {draw(names)}\n".encode() + sized(body, draw(st.sampled_from([0, 0, 0, -1, 1, 5])))
    if kind == "line":
        verb = draw(st.sampled_from(["SUB", "RDY", "FIN", "REQ", "TOUCH", "CLS", "NOP", "BOGUS", ""]))
        return f"{verb} {draw(line_params)}".encode() + draw(st.sampled_from([b"\n", b"\r\n"]))
    return draw(st.binary(max_size=30))


@st.composite
def command_streams(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    stream = draw(st.sampled_from([MAGIC_V2, MAGIC_V2, b"", b"  V1"])) + b"".join(
        draw(st.lists(commands(), max_size=5))
    )
    stream = mutate(draw, stream)
    return stream, draw(chunked(stream))


limits = st.fixed_dictionaries(
    {
        "max_msg_size": st.sampled_from([1, 8, 1 << 20]),
        "max_body_size": st.sampled_from([4, 9, 30, 5 << 20]),
        "max_req_timeout": st.sampled_from([0, 10, 3_600_000]),
    }
)


def test_command_size_boundaries_agree() -> None:
    """Every body command's declared sizes around the limits, exhaustively."""
    for line in (b"PUB t\n", b"DPUB t 5\n", b"IDENTIFY\n", b"AUTH\n", b"MPUB t\n"):
        for length in range(12):
            for delta in (-(2**31), -1, 0, 1):
                for max_msg_size, max_body_size in ((1, 4), (4, 9), (8, 8), (10, 30)):
                    body = bytes(length)
                    if line.startswith(b"MPUB"):
                        body = int32(1) + sized(body, delta)
                        delta = 0
                    stream = MAGIC_V2 + line + sized(body, delta)
                    cut = len(MAGIC_V2) + len(line) + 2
                    for chunks in ([stream], [stream[:cut], stream[cut:]]):
                        assert_agree(
                            command_parser(max_msg_size=max_msg_size, max_body_size=max_body_size), stream, chunks
                        )


@given(command_streams(), limits)
def test_command_parsers_agree(case: tuple[bytes, list[bytes]], parser_limits: dict[str, int]) -> None:
    stream, chunks = case
    assert_agree(command_parser(**parser_limits), stream, chunks)


# --- encoders -------------------------------------------------------------


def encoder_outcome(call: Callable[[], bytes]) -> tuple[Any, ...]:
    try:
        return ("ok", call())
    except (TypeError, ValueError) as error:
        return ("error", type(error).__name__, str(error) if isinstance(error, ValueError) else "")


anything = st.one_of(
    st.none(), st.integers(-(2**70), 2**70), st.text(max_size=8), st.binary(max_size=20), st.booleans()
)


@given(
    st.sampled_from(["encode_pub", "encode_mpub", "encode_dpub", "encode_fin", "encode_message", "encode_response"]),
    st.one_of(names, anything),
    st.one_of(bodies, anything, st.lists(st.one_of(bodies, anything), max_size=3)),
    st.one_of(st.integers(-5, 70000), anything),
)
def test_encoders_agree(function: str, first: Any, second: Any, number: Any) -> None:
    compiled, pure = twins()
    arguments = {
        "encode_pub": (first, second),
        "encode_mpub": (first, second),
        "encode_dpub": (first, number, second),
        "encode_fin": (second,),
        "encode_message": (number, number, second, second),
        "encode_response": (second,),
    }[function]
    expected = encoder_outcome(lambda: getattr(pure, function)(*arguments))
    assert encoder_outcome(lambda: getattr(compiled, function)(*arguments)) == expected
