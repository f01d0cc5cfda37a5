"""Server direction of the frame codec: parsing client commands as nsqd does. Both twins."""

import struct
from types import ModuleType

import pytest

from almanet.wire.errors import CommandError, ProtocolError
from almanet.wire.protocol import MAGIC_V2, MAX_COMMAND_LINE

MESSAGE_ID = b"0123456789abcdef"


def sized(data: bytes) -> bytes:
    return struct.pack(">i", len(data)) + data


def parse_all(frames: ModuleType, data: bytes, step: int = 0, **limits: int) -> list[object]:
    parser = frames.CommandParser(**limits)
    chunks = [data[i : i + step] for i in range(0, len(data), step)] if step else [data]
    out: list[object] = []
    for chunk in chunks:
        parser.feed(chunk)
        out.extend(parser)
    parser.feed_eof()
    return out


def refusal(frames: ModuleType, data: bytes, **limits: int) -> CommandError:
    """The error the parser raises on ``data`` (magic included), as soon as it is fed."""
    parser = frames.CommandParser(**limits)
    parser.feed(data)
    with pytest.raises(CommandError) as caught:
        list(parser)
    return caught.value


# --- round trips: command encoders -> server parser -----------------------


@pytest.mark.parametrize("step", [0, 1, 5, 64])
def test_encoded_commands_parse_back(frames: ModuleType, step: int) -> None:
    Command = frames.Command
    stream = MAGIC_V2 + b"".join(
        [
            frames.encode_identify({"client_id": "x"}),
            frames.encode_auth(b"secret"),
            frames.encode_sub("topic", "channel#ephemeral"),
            frames.encode_rdy(100),
            frames.encode_pub("topic", b"body"),
            frames.encode_mpub("topic", [b"a", b"bc", b"def"]),
            frames.encode_dpub("topic", 250, b"later"),
            frames.encode_fin(MESSAGE_ID),
            frames.encode_req(MESSAGE_ID, 10),
            frames.encode_touch(MESSAGE_ID),
            b"NOP\n",
            b"CLS\n",
        ]
    )
    assert parse_all(frames, stream, step) == [
        Command(b"IDENTIFY", [], b'{"client_id":"x"}'),
        Command(b"AUTH", [], b"secret"),
        Command(b"SUB", [b"topic", b"channel#ephemeral"]),
        Command(b"RDY", [b"100"]),
        Command(b"PUB", [b"topic"], b"body"),
        Command(b"MPUB", [b"topic"], None, [b"a", b"bc", b"def"]),
        Command(b"DPUB", [b"topic", b"250"], b"later"),
        Command(b"FIN", [MESSAGE_ID]),
        Command(b"REQ", [MESSAGE_ID, b"10"]),
        Command(b"TOUCH", [MESSAGE_ID]),
        Command(b"NOP", []),
        Command(b"CLS", []),
    ]


def test_carriage_return_and_raw_params(frames: ModuleType) -> None:
    # nsqd strips one "\r" and splits on single spaces; what the params mean is the broker's business.
    assert parse_all(frames, MAGIC_V2 + b"RDY 1\r\nFIN  x\nRDY\n") == [
        frames.Command(b"RDY", [b"1"]),
        frames.Command(b"FIN", [b"", b"x"]),
        frames.Command(b"RDY", []),
    ]


# --- nsqd's refusals, with nsqd's codes and texts -------------------------


def test_bad_magic(frames: ModuleType) -> None:
    error = refusal(frames, b"  V1")
    assert error.data == b"E_BAD_PROTOCOL"


def test_commands_before_magic_are_bad_protocol(frames: ModuleType) -> None:
    assert refusal(frames, b"PUB t\n").data == b"E_BAD_PROTOCOL"


def test_unknown_command(frames: ModuleType) -> None:
    assert refusal(frames, MAGIC_V2 + b"pub t\n").data == b"E_INVALID invalid command pub"
    assert refusal(frames, MAGIC_V2 + b"\n").data == b"E_INVALID invalid command "
    assert refusal(frames, MAGIC_V2 + b"\xff\xfe x\n").data == b"E_INVALID invalid command \xff\xfe"


@pytest.mark.parametrize(
    ("command", "data"),
    [
        (b"PUB\n", b"E_INVALID PUB insufficient number of parameters"),
        (b"MPUB\n", b"E_INVALID MPUB insufficient number of parameters"),
        (b"DPUB t\n", b"E_INVALID DPUB insufficient number of parameters"),
        (b"AUTH x\n", b"E_INVALID AUTH invalid number of parameters"),
        (b"PUB a!b\n", b'E_BAD_TOPIC PUB topic name "a!b" is not valid'),
        (b'PUB a"\\\t\x01\xff\n', b'E_BAD_TOPIC PUB topic name "a\\"\\\\\\t\\x01\\xff" is not valid'),
        ("PUB é\n".encode(), 'E_BAD_TOPIC PUB topic name "é" is not valid'.encode()),
        (b"MPUB a!b\n", b'E_BAD_TOPIC E_BAD_TOPIC MPUB topic name "a!b" is not valid'),
        (b"DPUB a!b 1\n", b'E_BAD_TOPIC DPUB topic name "a!b" is not valid'),
        (b"DPUB t 1s\n", b"E_INVALID DPUB could not parse timeout 1s"),
        (b"DPUB t 3600001\n", b"E_INVALID DPUB timeout 3600001 out of range 0-3600000"),
    ],
)
def test_line_refusals_do_not_wait_for_the_body(frames: ModuleType, command: bytes, data: bytes) -> None:
    assert refusal(frames, MAGIC_V2 + command).data == data


@pytest.mark.parametrize(
    ("command", "size", "data"),
    [
        (b"PUB t\n", 0, b"E_BAD_MESSAGE PUB invalid message body size 0"),
        (b"PUB t\n", -1, b"E_BAD_MESSAGE PUB invalid message body size -1"),
        (b"PUB t\n", 1048577, b"E_BAD_MESSAGE PUB message too big 1048577 > 1048576"),
        (b"DPUB t 0\n", 0, b"E_BAD_MESSAGE DPUB invalid message body size 0"),
        (b"DPUB t 0\n", 1048577, b"E_BAD_MESSAGE DPUB message too big 1048577 > 1048576"),
        (b"MPUB t\n", 0, b"E_BAD_BODY MPUB invalid body size 0"),
        (b"MPUB t\n", 5242881, b"E_BAD_BODY MPUB body too big 5242881 > 5242880"),
        (b"IDENTIFY\n", 0, b"E_BAD_BODY IDENTIFY invalid body size 0"),
        (b"IDENTIFY\n", 5242881, b"E_BAD_BODY IDENTIFY body too big 5242881 > 5242880"),
        (b"AUTH\n", -7, b"E_BAD_BODY AUTH invalid body size -7"),
        (b"AUTH\n", 5242881, b"E_BAD_BODY AUTH body too big 5242881 > 5242880"),
    ],
)
def test_size_refusals_do_not_wait_for_the_body(frames: ModuleType, command: bytes, size: int, data: bytes) -> None:
    assert refusal(frames, MAGIC_V2 + command + struct.pack(">i", size)).data == data


def mpub(body: bytes) -> bytes:
    return MAGIC_V2 + b"MPUB t\n" + sized(body)


@pytest.mark.parametrize(
    ("body", "data"),
    [
        (b"\0\0\0", b"E_BAD_BODY MPUB failed to read message count"),
        (struct.pack(">i", 0), b"E_BAD_BODY MPUB invalid message count 0"),
        (struct.pack(">i", -3), b"E_BAD_BODY MPUB invalid message count -3"),
        (struct.pack(">i", 1048576), b"E_BAD_BODY MPUB invalid message count 1048576"),
        (struct.pack(">i", 2) + sized(b"a"), b"E_BAD_MESSAGE MPUB failed to read message(1) body size"),
        (struct.pack(">ii", 1, 0), b"E_BAD_MESSAGE MPUB invalid message(0) body size 0"),
        (struct.pack(">ii", 1, -2), b"E_BAD_MESSAGE MPUB invalid message(0) body size -2"),
        (struct.pack(">ii", 1, 1048577), b"E_BAD_MESSAGE MPUB message too big 1048577 > 1048576"),
        (struct.pack(">ii", 1, 5) + b"abc", b"E_BAD_MESSAGE MPUB failed to read message body"),
        (struct.pack(">i", 1) + sized(b"a") + b"extra", b"E_BAD_BODY MPUB body size 14 does not match its 1 messages"),
    ],
)
def test_mpub_refusals(frames: ModuleType, body: bytes, data: bytes) -> None:
    assert refusal(frames, mpub(body)).data == data


def test_mpub_is_all_or_nothing(frames: ModuleType) -> None:
    """A bad message anywhere refuses the whole MPUB: no Command for its good messages."""
    parser = frames.CommandParser()
    parser.feed(mpub(struct.pack(">i", 3) + sized(b"a") + sized(b"b") + struct.pack(">i", 0)))
    with pytest.raises(CommandError, match=r"message\(2\) body size 0"):
        next(parser)


def test_limits_are_configurable(frames: ModuleType) -> None:
    limits = {"max_msg_size": 10, "max_body_size": 40, "max_req_timeout": 1000}
    assert parse_all(frames, MAGIC_V2 + b"PUB t\n" + sized(b"x" * 10), **limits)[0].body == b"x" * 10
    assert refusal(frames, MAGIC_V2 + b"PUB t\n" + sized(b"x" * 11), **limits).data == (
        b"E_BAD_MESSAGE PUB message too big 11 > 10"
    )
    assert refusal(frames, MAGIC_V2 + b"MPUB t\n" + struct.pack(">i", 41), **limits).data == (
        b"E_BAD_BODY MPUB body too big 41 > 40"
    )
    assert refusal(frames, MAGIC_V2 + b"DPUB t 1001\n", **limits).data == (
        b"E_INVALID DPUB timeout 1001 out of range 0-1000"
    )
    assert refusal(frames, MAGIC_V2 + b"MPUB t\n" + sized(struct.pack(">i", 8)), **limits).data == (
        b"E_BAD_BODY MPUB invalid message count 8"
    )


def test_longest_command_line(frames: ModuleType) -> None:
    line = b"SUB " + b"a" * (MAX_COMMAND_LINE - 5) + b"\n"
    assert len(line) == MAX_COMMAND_LINE
    assert parse_all(frames, MAGIC_V2 + line, step=1000)[0].params == [b"a" * (MAX_COMMAND_LINE - 5)]


@pytest.mark.parametrize("step", [0, 1000])
def test_too_long_command_line_closes_without_error_frame(frames: ModuleType, step: int) -> None:
    parser = frames.CommandParser()
    data = MAGIC_V2 + b"SUB " + b"a" * (MAX_COMMAND_LINE - 4)
    chunks = [data[i : i + step] for i in range(0, len(data), step)] if step else [data]
    with pytest.raises(ProtocolError, match="longer than 16384") as caught:
        for chunk in chunks:
            parser.feed(chunk)
            list(parser)
    assert not isinstance(caught.value, CommandError)


def test_connection_closed_mid_command(frames: ModuleType) -> None:
    parser = frames.CommandParser()
    parser.feed(MAGIC_V2 + b"PUB t\n\0\0\0\x05ab")
    assert list(parser) == []
    with pytest.raises(ProtocolError, match="closed in the middle of a command"):
        parser.feed_eof()


def test_refusal_is_sticky(frames: ModuleType) -> None:
    parser = frames.CommandParser()
    parser.feed(MAGIC_V2 + b"NOP\nBAD\nNOP\n")
    assert next(parser) == frames.Command(b"NOP", [])
    for use in (lambda: next(parser), lambda: next(parser), lambda: parser.feed(b"NOP\n"), parser.feed_eof):
        with pytest.raises(CommandError, match="invalid command BAD"):
            use()


def test_error_frame_text() -> None:
    error = CommandError("E_BAD_BODY", "IDENTIFY invalid body size 0")
    assert str(error) == "E_BAD_BODY IDENTIFY invalid body size 0"
    assert error.data == b"E_BAD_BODY IDENTIFY invalid body size 0"
    assert (error.code, error.description) == ("E_BAD_BODY", "IDENTIFY invalid body size 0")
