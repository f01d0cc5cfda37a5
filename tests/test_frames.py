"""Client direction of the frame codec: reading frames, encoding commands. Both twins."""

import json
import struct
from types import ModuleType

import pytest

from almanet.wire.errors import FrameError, ProtocolError
from almanet.wire.protocol import DEFAULT_MAX_FRAME_SIZE

MESSAGE_ID = b"0123456789abcdef"


def frame(frame_type: int, data: bytes) -> bytes:
    """A frame built by hand from the spec, independent of the codec."""
    return struct.pack(">ii", len(data) + 4, frame_type) + data


def message(timestamp: int, attempts: int, message_id: bytes, body: bytes) -> bytes:
    return frame(2, struct.pack(">qH", timestamp, attempts) + message_id + body)


def read_all(frames: ModuleType, chunks: list[bytes], **options: int) -> list[object]:
    reader = frames.FrameReader(**options)
    out: list[object] = []
    for chunk in chunks:
        reader.feed(chunk)
        out.extend(reader)
    reader.feed_eof()
    return out


# --- reading --------------------------------------------------------------


def test_reads_each_frame_type(frames: ModuleType) -> None:
    stream = frame(0, b"OK") + frame(1, b"E_INVALID bad") + message(1_700_000_000_000_000_000, 3, MESSAGE_ID, b"hi")
    response, error, msg = read_all(frames, [stream])
    assert isinstance(response, frames.ResponseFrame) and response.data == b"OK"
    assert isinstance(error, frames.ErrorFrame) and error.data == b"E_INVALID bad"
    assert isinstance(msg, frames.MessageFrame)
    assert (msg.timestamp, msg.attempts, msg.id, msg.body) == (1_700_000_000_000_000_000, 3, MESSAGE_ID, b"hi")


def test_same_frames_whatever_the_chunking(frames: ModuleType) -> None:
    stream = b"".join(message(i, i, MESSAGE_ID, bytes([i]) * i) for i in range(1, 50)) + frame(0, b"_heartbeat_")
    whole = read_all(frames, [stream])
    assert len(whole) == 50
    assert read_all(frames, [stream[i : i + 1] for i in range(len(stream))]) == whole
    assert read_all(frames, [stream[i : i + 7] for i in range(0, len(stream), 7)]) == whole


def test_accepts_any_bytes_like_chunk(frames: ModuleType) -> None:
    stream = frame(0, b"OK")
    assert read_all(frames, [bytearray(stream[:3]), memoryview(stream)[3:]]) == [frames.ResponseFrame(b"OK")]


def test_unsigned_attempts_and_signed_timestamp(frames: ModuleType) -> None:
    (msg,) = read_all(frames, [message(-1, 65535, MESSAGE_ID, b"x")])
    assert (msg.timestamp, msg.attempts) == (-1, 65535)


def test_empty_response_and_empty_message_body(frames: ModuleType) -> None:
    assert read_all(frames, [frame(0, b""), message(0, 1, MESSAGE_ID, b"")]) == [
        frames.ResponseFrame(b""),
        frames.MessageFrame(0, 1, MESSAGE_ID, b""),
    ]


def test_large_frame_in_small_chunks(frames: ModuleType) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB
    stream = message(7, 1, MESSAGE_ID, body)
    (msg,) = read_all(frames, [stream[i : i + 65536] for i in range(0, len(stream), 65536)])
    assert msg.body == body


def test_frames_before_a_bad_one_are_delivered(frames: ModuleType) -> None:
    reader = frames.FrameReader()
    reader.feed(frame(0, b"OK") + frame(7, b"junk"))
    assert next(reader) == frames.ResponseFrame(b"OK")
    with pytest.raises(FrameError, match="unknown frame type 7"):
        next(reader)


@pytest.mark.parametrize(
    ("header", "error"),
    [
        (struct.pack(">i", 3), "invalid frame size 3"),
        (struct.pack(">i", 0), "invalid frame size 0"),
        (struct.pack(">i", -1), "invalid frame size -1"),
        (struct.pack(">i", -(2**31)), f"invalid frame size {-(2**31)}"),
        (struct.pack(">i", DEFAULT_MAX_FRAME_SIZE + 1), f"frame size {DEFAULT_MAX_FRAME_SIZE + 1} exceeds the limit"),
        (struct.pack(">ii", 8, 3), "unknown frame type 3"),
        (struct.pack(">ii", 8, -1), "unknown frame type -1"),
        (struct.pack(">ii", 4 + 25, 2), "message frame of 25 bytes is shorter than its header"),
    ],
)
def test_bad_header_is_refused_as_soon_as_it_is_read(frames: ModuleType, header: bytes, error: str) -> None:
    reader = frames.FrameReader()
    reader.feed(header)  # nothing after the header: the check must not wait for the frame's data
    with pytest.raises(FrameError, match=error):
        next(reader)
    # The reader stays broken: the stream cannot be resynchronised.
    with pytest.raises(FrameError, match=error):
        next(reader)
    with pytest.raises(FrameError, match=error):
        reader.feed(b"more")
    with pytest.raises(FrameError, match=error):
        reader.feed_eof()


def test_max_frame_size_is_configurable(frames: ModuleType) -> None:
    assert read_all(frames, [frame(0, b"x" * 96)], max_frame_size=100) == [frames.ResponseFrame(b"x" * 96)]
    with pytest.raises(FrameError, match="frame size 101 exceeds the limit of 100"):
        read_all(frames, [frame(0, b"x" * 97)], max_frame_size=100)


def test_connection_closed_mid_frame(frames: ModuleType) -> None:
    reader = frames.FrameReader()
    reader.feed(frame(0, b"OK")[:-1])
    assert list(reader) == []
    assert reader.buffered == 9
    with pytest.raises(FrameError, match="connection closed in the middle of a frame"):
        reader.feed_eof()


def test_frame_error_is_a_protocol_error() -> None:
    assert issubclass(FrameError, ProtocolError)


# --- names ----------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [b"a", b"a" * 64, b"a.b_c-D9", b"t#ephemeral", b"x" * 54 + b"#ephemeral", b"..", b"-"],
)
def test_valid_names(frames: ModuleType, name: bytes) -> None:
    assert frames.is_valid_name(name)


@pytest.mark.parametrize(
    "name",
    [
        b"",
        b"a" * 65,
        b"#ephemeral",
        b"a b",
        b"a#ephemeral2",
        b"a#eph",
        b"a#ephemeral#ephemeral",
        "é".encode(),
        b"x" * 55 + b"#ephemeral",
        b"a\n",
        b"a/b",
    ],
)
def test_invalid_names(frames: ModuleType, name: bytes) -> None:
    assert not frames.is_valid_name(name)


def test_parse_base10(frames: ModuleType) -> None:
    assert frames.parse_base10(b"0") == 0
    assert frames.parse_base10(b"") == 0  # as nsqd reads it
    assert frames.parse_base10(b"007") == 7
    assert frames.parse_base10(b"18446744073709551616") == 18446744073709551616
    for bad in (b"-1", b"+1", b"1.5", b" 1", b"1a", b"\xff"):
        assert frames.parse_base10(bad) is None


# --- encoding commands ----------------------------------------------------


def test_command_bytes_follow_the_spec(frames: ModuleType) -> None:
    assert frames.encode_sub("t", "c#ephemeral") == b"SUB t c#ephemeral\n"
    assert frames.encode_pub("t", b"hi") == b"PUB t\n\x00\x00\x00\x02hi"
    assert frames.encode_mpub("t", [b"a", b"bc"]) == (
        b"MPUB t\n" + struct.pack(">I", 4 + 5 + 6) + struct.pack(">I", 2) + b"\x00\x00\x00\x01a\x00\x00\x00\x02bc"
    )
    assert frames.encode_dpub("t", 1500, b"x") == b"DPUB t 1500\n\x00\x00\x00\x01x"
    assert frames.encode_rdy(2500) == b"RDY 2500\n"
    assert frames.encode_fin(MESSAGE_ID) == b"FIN " + MESSAGE_ID + b"\n"
    assert frames.encode_req(MESSAGE_ID, 0) == b"REQ " + MESSAGE_ID + b" 0\n"
    assert frames.encode_touch(MESSAGE_ID) == b"TOUCH " + MESSAGE_ID + b"\n"
    assert frames.encode_auth(b"secret") == b"AUTH\n\x00\x00\x00\x06secret"
    identify = frames.encode_identify({"client_id": "a", "feature_negotiation": True})
    assert identify.startswith(b"IDENTIFY\n")
    (size,) = struct.unpack(">I", identify[9:13])
    assert json.loads(identify[13:]) == {"client_id": "a", "feature_negotiation": True}
    assert size == len(identify) - 13


@pytest.mark.parametrize("topic", ["", "a b", "a" * 65, "#ephemeral", "é", "a\n"])
def test_invalid_topic_is_refused_before_encoding(frames: ModuleType, topic: str) -> None:
    for encode in (
        lambda: frames.encode_pub(topic, b"x"),
        lambda: frames.encode_mpub(topic, [b"x"]),
        lambda: frames.encode_dpub(topic, 0, b"x"),
        lambda: frames.encode_sub(topic, "c"),
        lambda: frames.encode_sub("t", topic),
    ):
        with pytest.raises(ValueError, match=r"invalid NSQ (topic|channel) name"):
            encode()


def test_bad_arguments_are_refused(frames: ModuleType) -> None:
    with pytest.raises(TypeError):
        frames.encode_pub(b"t", b"x")
    with pytest.raises(TypeError):
        frames.encode_pub("t", "text")
    with pytest.raises(ValueError, match="must not be empty"):
        frames.encode_pub("t", b"")
    with pytest.raises(ValueError, match="must not be empty"):
        frames.encode_mpub("t", [b"x", b""])
    with pytest.raises(ValueError, match="at least one message"):
        frames.encode_mpub("t", [])
    with pytest.raises(ValueError, match="16 bytes, not 3"):
        frames.encode_fin(b"abc")
    with pytest.raises(TypeError):
        frames.encode_touch(MESSAGE_ID.decode())
    with pytest.raises(ValueError, match="must not be negative"):
        frames.encode_rdy(-1)
    with pytest.raises(ValueError, match="must not be negative"):
        frames.encode_req(MESSAGE_ID, -1)
    with pytest.raises(ValueError, match="must not be negative"):
        frames.encode_dpub("t", -1, b"x")
    with pytest.raises(ValueError, match="must not be empty"):
        frames.encode_auth(b"")


# --- encoding frames (broker side) ----------------------------------------


def test_frame_encoders(frames: ModuleType) -> None:
    assert frames.encode_response(b"OK") == frame(0, b"OK")
    assert frames.encode_error(b"E_INVALID x") == frame(1, b"E_INVALID x")
    assert frames.encode_message(-5, 65535, MESSAGE_ID, b"body") == message(-5, 65535, MESSAGE_ID, b"body")
    assert frames.encode_message(2**63 - 1, 0, MESSAGE_ID, b"") == message(2**63 - 1, 0, MESSAGE_ID, b"")


def test_frame_encoders_refuse_bad_arguments(frames: ModuleType) -> None:
    with pytest.raises(ValueError, match="attempts"):
        frames.encode_message(0, 65536, MESSAGE_ID, b"x")
    with pytest.raises(ValueError, match="attempts"):
        frames.encode_message(0, -1, MESSAGE_ID, b"x")
    with pytest.raises(ValueError, match="timestamp"):
        frames.encode_message(2**63, 0, MESSAGE_ID, b"x")
    with pytest.raises(ValueError, match="16 bytes"):
        frames.encode_message(0, 0, b"short", b"x")
    with pytest.raises(TypeError):
        frames.encode_message(0, 0, MESSAGE_ID, "x")
    with pytest.raises(TypeError):
        frames.encode_response("OK")


def test_encoded_frames_read_back(frames: ModuleType) -> None:
    stream = (
        frames.encode_response(b"OK")
        + frames.encode_message(123, 2, MESSAGE_ID, b"payload")
        + frames.encode_error(b"E_FIN_FAILED FIN x failed")
    )
    assert read_all(frames, [stream]) == [
        frames.ResponseFrame(b"OK"),
        frames.MessageFrame(123, 2, MESSAGE_ID, b"payload"),
        frames.ErrorFrame(b"E_FIN_FAILED FIN x failed"),
    ]


# --- hostile Python objects (found by an AddressSanitizer fuzz of the compiled twin) ---


def test_feeding_a_parser_from_inside_its_iteration_is_refused(frames: ModuleType) -> None:
    """Code run during parsing (here a comparison) must not move the buffer being parsed."""

    class Timeout(int):
        def __lt__(self, other: object) -> bool:
            parser.feed(b"z" * (1 << 20))
            return False

    parser = frames.CommandParser(max_req_timeout=Timeout(1000))
    parser.feed(b"  V2DPUB t 5\n\x00\x00\x00\x03abc")
    with pytest.raises(BufferError, match="while it is reading"):
        list(parser)


def test_mpub_writes_what_it_measured(frames: ModuleType) -> None:
    class Shifting:  # a different sequence on each iteration
        iterations = 0

        def __len__(self) -> int:
            return 1

        def __iter__(self):  # type: ignore[no-untyped-def]
            self.iterations += 1
            return iter([b"a"] if self.iterations == 1 else [b"a" * 4096])

    assert frames.encode_mpub("t", Shifting()) == frames.encode_mpub("t", [b"a"])

    class Growing(bytes):  # measuring it grows an element already measured
        def __len__(self) -> int:
            bodies[0] = b"y" * 4096
            return bytes.__len__(self)

    bodies = [b"y", Growing(b"x")]
    assert frames.encode_mpub("t", bodies) == frames.encode_mpub("t", [b"y", b"x"])


def test_objects_faking_bytes_are_refused(frames: ModuleType) -> None:
    class Fake(list):  # type: ignore[type-arg]
        __class__ = bytes  # type: ignore[assignment]

    fake = Fake(range(64))
    with pytest.raises(TypeError):
        frames.encode_pub("t", fake)
    with pytest.raises(TypeError):
        frames.encode_mpub("t", [fake])
    with pytest.raises(TypeError):
        frames.encode_fin(fake)


def test_str_subclass_cannot_change_a_topic_name(frames: ModuleType) -> None:
    class Odd(str):
        def encode(self, *args: object, **kwargs: object) -> bytes:  # type: ignore[override]
            return None  # type: ignore[return-value]

    assert frames.encode_pub(Odd("t"), b"body") == b"PUB t\n\x00\x00\x00\x04body"


def test_nested_read_cannot_unlock_feeding(frames: ModuleType) -> None:
    """A next() from inside a read must not clear the guard of the read around it."""

    class Timeout(int):
        def __lt__(self, other: object) -> bool:
            next(parser)
            return False

    parser = frames.CommandParser(max_req_timeout=Timeout(1000))
    parser.feed(b"  V2DPUB t 5\n\x00\x00\x00\x03abc")
    with pytest.raises(BufferError, match="while it is reading"):
        list(parser)


def test_body_sizes_are_real_sizes(frames: ModuleType) -> None:
    class Lying(bytes):
        def __len__(self) -> int:
            return 3

    assert frames.encode_pub("t", Lying(b"0123456789")) == frames.encode_pub("t", b"0123456789")
    assert frames.encode_mpub("t", [Lying(b"0123456789")]) == frames.encode_mpub("t", [b"0123456789"])
