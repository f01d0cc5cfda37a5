"""The RPC envelope codec: wire format, round trips, refusals, the protocol's test vectors. Both twins."""

import array
import json
import math
import re
import struct
from enum import IntEnum
from pathlib import Path
from types import ModuleType
from typing import Any

import msgpack
import pytest

from helpers import load_twin

REPLY_TO = "_almanet.reply.0123456789abcdef#ephemeral"
DEADLINE = 1_767_225_600_000  # 2026-01-01T00:00:00Z
PROTOCOL = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"


def uint64(value: int) -> bytes:
    return struct.pack(">BQ", 0xCF, value)


def str8(text: str) -> bytes:
    raw = text.encode()
    return bytes([0xD9, len(raw)]) + raw


def as_msgpack_reads(value: Any) -> Any:
    """``value`` as it comes back from msgpack (tuples become lists)."""
    return msgpack.unpackb(msgpack.packb(value), raw=False, strict_map_key=False)


# --- the wire format ----------------------------------------------------------


def test_invocation_layout(envelope: ModuleType) -> None:
    body = envelope.encode_invocation(1, REPLY_TO, DEADLINE, None, "Aidar")
    assert body == b"\x97\x01\x00" + uint64(1) + str8(REPLY_TO) + uint64(DEADLINE) + b"\xc0" + b"\xa5Aidar"


def test_invocation_with_headers_and_without_reply_topic(envelope: ModuleType) -> None:
    headers = {"trace": "abc", "attempt": 2}
    body = envelope.encode_invocation(7, None, 0, headers, [1, "x"])
    assert body == b"\x97\x01\x00" + uint64(7) + b"\xc0" + uint64(0) + msgpack.packb(headers) + msgpack.packb([1, "x"])


@pytest.mark.parametrize(("ok", "kind"), [(True, 1), (False, 2)])
def test_reply_layout(envelope: ModuleType, ok: bool, kind: int) -> None:
    body = envelope.encode_reply(2**64 - 1, ok, "Hello, Aidar!")
    assert body == bytes([0x94, 0x01, kind]) + uint64(2**64 - 1) + msgpack.packb("Hello, Aidar!")


def test_any_msgpack_library_reads_an_envelope(envelope: ModuleType) -> None:
    invocation = envelope.encode_invocation(1, REPLY_TO, DEADLINE, {"trace": "abc"}, b"\x00")
    assert msgpack.unpackb(invocation) == [1, 0, 1, REPLY_TO, DEADLINE, {"trace": "abc"}, b"\x00"]
    assert msgpack.unpackb(envelope.encode_reply(3, False, ["denied", [], None])) == [1, 2, 3, ["denied", [], None]]


def test_version_constant(envelope: ModuleType) -> None:
    assert envelope.ENVELOPE_VERSION == 1


def test_both_twins_share_one_error_class() -> None:
    error_class = load_twin("envelope", "py").EnvelopeError
    assert load_twin("envelope", "c").EnvelopeError is error_class
    assert issubclass(error_class, ValueError)


def nested(depth: int, innermost: Any) -> list[Any]:
    value = [innermost]
    for _ in range(depth - 1):
        value = [value]
    return value


# Values at every boundary of msgpack's forms, and the types the compiled twin inlines or leaves to msgpack.
PAYLOADS: list[Any] = [
    None,
    True,
    False,
    *(0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1),
    *(-1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**63)),
    *(0.0, -0.0, 1.5, -2.25e300, math.inf, -math.inf),
    *("", "Aidar", "é" * 10, "a" * 31, "a" * 32, "a" * 255, "a" * 256, "a" * 65535, "a" * 65536, "\U0001f600"),
    *(b"", b"\x00\xff", b"x" * 255, b"x" * 256, b"x" * 65535, b"x" * 65536),
    *([], [1] * 15, [1] * 16, [1] * 65535, [1] * 65536, (1, "two"), [[[[[[]]]]]], [None, True, 1.5, b"", "x"]),
    *({}, {"a": 1}, {str(i): i for i in range(15)}, {str(i): i for i in range(16)}, {i: i for i in range(65536)}),
    {1: "int key", 1.5: "float key", None: "nil key", b"k": "bin key"},
    {True: "bool key", False: "another"},
    {"nested": {"list": [1, {"deep": [b"x", None]}], "t": (1, 2)}},
    nested(40, "deeper than the compiled twin inlines"),
    msgpack.ExtType(5, b"ext"),
    msgpack.Timestamp(1_767_225_600, 5),
    bytearray(b"bytearray"),
    memoryview(b"memoryview"),
    ["a list", "with", ("a", "tuple"), {"and": msgpack.ExtType(1, b"")}],
]


def payload_id(payload: Any) -> str:
    text = repr(payload)
    return text if len(text) <= 40 else f"{type(payload).__name__}-{len(text)}"


@pytest.mark.parametrize("payload", PAYLOADS, ids=payload_id)
def test_payload_is_encoded_as_msgpack_encodes_it(envelope: ModuleType, payload: Any) -> None:
    assert envelope.encode_reply(1, True, payload)[12:] == msgpack.packb(payload)
    invocation = envelope.encode_invocation(1, "t", 0, None, payload)
    assert invocation[25:] == msgpack.packb(payload)


@pytest.mark.parametrize("payload", PAYLOADS, ids=payload_id)
def test_payload_round_trips(envelope: ModuleType, payload: Any) -> None:
    expected = as_msgpack_reads(payload)
    assert envelope.decode(envelope.encode_reply(9, False, payload)) == envelope.Reply(9, False, expected)
    invocation = envelope.decode(envelope.encode_invocation(9, REPLY_TO, DEADLINE, {"h": payload}, payload))
    assert invocation == envelope.Invocation(9, REPLY_TO, DEADLINE, {"h": expected}, expected)


def test_nan_round_trips(envelope: ModuleType) -> None:
    reply = envelope.decode(envelope.encode_reply(1, True, math.nan))
    assert math.isnan(reply.payload)


def test_bytes_and_str_keep_their_types(envelope: ModuleType) -> None:
    reply = envelope.decode(envelope.encode_reply(1, True, [b"raw", "text", {b"k": "v", "k": b"v"}]))
    assert reply.payload == [b"raw", "text", {b"k": "v", "k": b"v"}]
    assert [type(item) for item in reply.payload[:2]] == [bytes, str]


@pytest.mark.parametrize("reply_to", ["", "t", "a" * 255, "€" * 85, "_almanet.reply.ffffffffffffffff#ephemeral"])
def test_reply_topic_is_str8_up_to_255_bytes(envelope: ModuleType, reply_to: str) -> None:
    body = envelope.encode_invocation(1, reply_to, 0, None, None)
    assert body[12 : 14 + len(reply_to.encode())] == str8(reply_to)
    assert envelope.decode(body).reply_to == reply_to


@pytest.mark.parametrize("value", [0, 1, 2**63 - 1, 2**63, 2**64 - 1])
def test_call_id_and_deadline_take_any_uint64(envelope: ModuleType, value: int) -> None:
    body = envelope.encode_invocation(value, None, value, None, None)
    assert body[3:12] == uint64(value) and body[13:22] == uint64(value)
    decoded = envelope.decode(body)
    assert (decoded.call_id, decoded.deadline) == (value, value)
    assert envelope.decode(envelope.encode_reply(value, True, None)).call_id == value


class CallId(IntEnum):
    FIRST = 1


def test_int_subclasses_are_ints(envelope: ModuleType) -> None:
    assert envelope.encode_invocation(CallId.FIRST, None, CallId.FIRST, None, None) == envelope.encode_invocation(
        1, None, 1, None, None
    )


# --- encoder refusals ---------------------------------------------------------

GOOD_INVOCATION: dict[str, Any] = {"call_id": 1, "reply_to": "t", "deadline": 0, "headers": None, "payload": "x"}


class Opaque:
    pass


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"call_id": -1}, ValueError, "the call id must be in 0..2**64-1, got -1"),
        ({"call_id": 2**64}, ValueError, "the call id must be in 0..2**64-1, got 18446744073709551616"),
        ({"call_id": "1"}, TypeError, "the call id must be an int, not str"),
        ({"call_id": 1.0}, TypeError, "the call id must be an int, not float"),
        ({"call_id": True}, TypeError, "the call id must be an int, not bool"),
        ({"call_id": None}, TypeError, "the call id must be an int, not NoneType"),
        ({"reply_to": b"t"}, TypeError, "the reply topic must be a str or None, not bytes"),
        ({"reply_to": "a" * 256}, ValueError, "the reply topic must be at most 255 bytes of UTF-8, got 256"),
        ({"reply_to": "é" * 128}, ValueError, "the reply topic must be at most 255 bytes of UTF-8, got 256"),
        ({"reply_to": "\ud800"}, UnicodeEncodeError, "surrogates not allowed"),
        ({"deadline": -1}, ValueError, "the deadline must be in 0..2**64-1, got -1"),
        ({"deadline": None}, TypeError, "the deadline must be an int, not NoneType"),
        ({"headers": []}, TypeError, "the headers must be a dict or None, not list"),
        ({"headers": {1: "x"}}, TypeError, "a header name must be a str, not int"),
        ({"headers": {"h": Opaque()}}, TypeError, "the headers cannot be encoded as msgpack: can not serialize"),
        ({"payload": Opaque()}, TypeError, "the payload cannot be encoded as msgpack: can not serialize"),
        ({"payload": {1, 2}}, TypeError, "the payload cannot be encoded as msgpack: can not serialize"),
        ({"payload": [1, Opaque()]}, TypeError, "the payload cannot be encoded as msgpack: can not serialize"),
        ({"payload": 2**64}, TypeError, "the payload cannot be encoded as msgpack: Integer value out of range"),
        ({"payload": -(2**63) - 1}, TypeError, "the payload cannot be encoded as msgpack: Integer value out of"),
        ({"payload": "\udc80"}, TypeError, "the payload cannot be encoded as msgpack: 'utf-8' codec can't encode"),
        (
            {"payload": nested(3000, None)},
            TypeError,
            "the payload cannot be encoded as msgpack: recursion limit exceeded",
        ),
        # The first bad argument, in wire order, is the one reported.
        ({"call_id": -1, "reply_to": 5, "payload": Opaque()}, ValueError, "the call id must be in"),
        ({"reply_to": 5, "deadline": -1}, TypeError, "the reply topic must be a str or None, not int"),
        ({"headers": 5, "payload": Opaque()}, TypeError, "the headers must be a dict or None, not int"),
    ],
)
def test_encode_invocation_refuses(
    envelope: ModuleType, changes: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as caught:
        envelope.encode_invocation(**{**GOOD_INVOCATION, **changes})
    assert str(caught.value).startswith(message) or message in str(caught.value)


@pytest.mark.parametrize(
    ("call_id", "ok", "payload", "error", "message"),
    [
        (1, 1, None, TypeError, "ok must be a bool, not int"),
        (1, None, None, TypeError, "ok must be a bool, not NoneType"),
        (-1, 1, None, ValueError, "the call id must be in 0..2**64-1, got -1"),
        ("x", True, None, TypeError, "the call id must be an int, not str"),
        (1, True, Opaque(), TypeError, "the payload cannot be encoded as msgpack: can not serialize"),
        (1, 0, Opaque(), TypeError, "ok must be a bool, not int"),
    ],
)
def test_encode_reply_refuses(
    envelope: ModuleType, call_id: Any, ok: Any, payload: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=re.escape(message)):
        envelope.encode_reply(call_id, ok, payload)


# --- decoding any msgpack encoding --------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (msgpack.packb([1, 0, 5, "t", 0, None, "x"]), ("invocation", 5, "t", 0, None, "x")),
        (msgpack.packb([1, 1, 5, "x"]), ("reply", 5, True, "x")),
        (msgpack.packb([1, 2, 2**64 - 1, None]), ("reply", 2**64 - 1, False, None)),
        (msgpack.packb([1, 0, 300, None, 70000, {"k": 1}, [1]]), ("invocation", 300, None, 70000, {"k": 1}, [1])),
        # array16 header, version as uint8, signed forms holding non-negative values
        (b"\xdc\x00\x04\xcc\x01\xd0\x01\xd3" + struct.pack(">q", 7) + b"\xc0", ("reply", 7, True, None)),
        (b"\xdd\x00\x00\x00\x04\x01\xcd\x00\x02\xd1\x00\x07\xc0", ("reply", 7, False, None)),
        # str16 reply topic, uint32 deadline, map16 headers, float32 payload
        (
            b"\x97\x01\x00\xce\x00\x00\x00\x05\xda\x00\x01t\xce\x00\x00\x00\x09\xde\x00\x01\xa1k\xc3\xca\x3f\xc0\x00\x00",
            ("invocation", 5, "t", 9, {"k": True}, 1.5),
        ),
        # str32 reply topic, bin8 and bin32 payloads inside an array
        (
            b"\x97\x01\x00\x05\xdb\x00\x00\x00\x01t\x00\xc0\x92\xc4\x01x\xc6\x00\x00\x00\x01y",
            ("invocation", 5, "t", 0, None, [b"x", b"y"]),
        ),
        # a negative int payload in every form
        (
            b"\x94\x01\x01\x05\x94\xff\xd0\x80\xd1\x80\x00\xd2\x80\x00\x00\x00",
            ("reply", 5, True, [-1, -128, -32768, -(2**31)]),
        ),
        # ext types are left to msgpack
        (msgpack.packb([1, 1, 5, msgpack.ExtType(3, b"e")]), ("reply", 5, True, msgpack.ExtType(3, b"e"))),
    ],
)
def test_decodes_any_msgpack_encoding(envelope: ModuleType, body: bytes, expected: tuple[Any, ...]) -> None:
    decoded = envelope.decode(body)
    if expected[0] == "invocation":
        assert decoded == envelope.Invocation(*expected[1:])
    else:
        assert decoded == envelope.Reply(*expected[1:])


def test_decodes_bytes_like_bodies(envelope: ModuleType) -> None:
    body = envelope.encode_invocation(1, REPLY_TO, DEADLINE, None, "Aidar")
    expected = envelope.Invocation(1, REPLY_TO, DEADLINE, None, "Aidar")
    assert envelope.decode(bytearray(body)) == expected
    assert envelope.decode(memoryview(body)) == expected
    assert envelope.decode(memoryview(b"..." + body)[3:]) == expected


def test_a_body_must_be_bytes_like(envelope: ModuleType) -> None:
    with pytest.raises(TypeError):
        envelope.decode("not bytes")
    with pytest.raises(BufferError):  # as msgpack: a buffer of 2-byte items is not bytes
        envelope.decode(memoryview(array.array("H", envelope.encode_reply(1, True, "x"))))


# --- decoder refusals ---------------------------------------------------------

INVOCATION = b"\x97\x01\x00" + uint64(1) + str8(REPLY_TO) + uint64(DEADLINE) + b"\xc0\xa5Aidar"
REPLY = b"\x94\x01\x01" + uint64(1) + b"\xa5Aidar"
ROUTE = (1, REPLY_TO)
NO_ROUTE = (None, None)


@pytest.mark.parametrize(
    ("body", "message", "route"),
    [
        (b"", "the envelope is empty", NO_ROUTE),
        (b"\xc1", "the envelope is not valid msgpack: reserved type byte 0xc1", NO_ROUTE),
        (b"\x91" * 3000, "the envelope is not valid msgpack: nested too deeply", NO_ROUTE),
        (INVOCATION[:-1], "the envelope is truncated", ROUTE),
        (INVOCATION[:3], "the envelope is truncated", NO_ROUTE),
        (INVOCATION[:13], "the envelope is truncated", NO_ROUTE),  # the reply topic is cut
        (REPLY[:-1], "the envelope is truncated", NO_ROUTE),
        (b"\xdd\xff\xff\xff\xff", "the envelope is truncated", NO_ROUTE),
        (b"\x97\x01\x00\x05\xdb\xff\xff\xff\xff", "the envelope is truncated", NO_ROUTE),
        (INVOCATION + b"\x00", "1 byte after the end of the envelope", ROUTE),
        (REPLY + b"\x00\x00", "2 bytes after the end of the envelope", NO_ROUTE),
        (msgpack.packb(5), "an envelope is a msgpack array, not 5", NO_ROUTE),
        (msgpack.packb(None), "an envelope is a msgpack array, not nil", NO_ROUTE),
        (msgpack.packb({"a": 1}), "an envelope is a msgpack array, not a map", NO_ROUTE),
        (msgpack.packb("x"), "an envelope is a msgpack array, not a str", NO_ROUTE),
        (msgpack.packb(b"x"), "an envelope is a msgpack array, not a bin", NO_ROUTE),
        (msgpack.packb(msgpack.ExtType(1, b"")), "an envelope is a msgpack array, not an ext", NO_ROUTE),
        (msgpack.packb([]), "the envelope array is empty", NO_ROUTE),
        (msgpack.packb([1]), "the envelope has no kind", NO_ROUTE),
        (msgpack.packb([2, 0, 5, "t"]), "unsupported envelope version 2", (5, "t")),
        (msgpack.packb([0, 0, 5, None, 0, None, 1]), "unsupported envelope version 0", (5, None)),
        (msgpack.packb(["1", 0, 5, "t", 0, None, 1]), "unsupported envelope version a str", (5, "t")),
        (msgpack.packb([True, 1, 5, 1]), "unsupported envelope version true", NO_ROUTE),
        (msgpack.packb([1.0, 1, 5, 1]), "unsupported envelope version 1.0", NO_ROUTE),
        (msgpack.packb([1, 3, 5, 1]), "unknown envelope kind 3", NO_ROUTE),
        (msgpack.packb([1, -1, 5, 1]), "unknown envelope kind -1", NO_ROUTE),
        (msgpack.packb([1, False, 5, None, 0, None, 1]), "unknown envelope kind false", NO_ROUTE),
        (msgpack.packb([1, 0, 5, "t", 0, None]), "an invocation has 7 elements, not 6", (5, "t")),
        (msgpack.packb([1, 0, 5, "t", 0, None, 1, 2]), "an invocation has 7 elements, not 8", (5, "t")),
        (msgpack.packb([1, 1, 5]), "a reply has 4 elements, not 3", NO_ROUTE),
        (msgpack.packb([1, 2, 5, 1, 2, 3, 4]), "a reply has 4 elements, not 7", NO_ROUTE),
        (msgpack.packb([1, 1, -5, None]), "the call id must be an unsigned int, not -5", NO_ROUTE),
        (msgpack.packb([1, 2, 1.0, None]), "the call id must be an unsigned int, not 1.0", NO_ROUTE),
        (msgpack.packb([1, 0, "5", "t", 0, None, 1]), "the call id must be an unsigned int, not a str", NO_ROUTE),
        (msgpack.packb([1, 0, None, "t", 0, None, 1]), "the call id must be an unsigned int, not nil", NO_ROUTE),
        (msgpack.packb([1, 0, 5, b"t", 0, None, 1]), "the reply topic must be nil or a str, not a bin", NO_ROUTE),
        (msgpack.packb([1, 0, 5, 7, 0, None, 1]), "the reply topic must be nil or a str, not 7", NO_ROUTE),
        (msgpack.packb([1, 0, 5, "t", -1, None, 1]), "the deadline must be an unsigned int, not -1", (5, "t")),
        (msgpack.packb([1, 0, 5, "t", None, None, 1]), "the deadline must be an unsigned int, not nil", (5, "t")),
        (msgpack.packb([1, 0, 5, None, 0.5, None, 1]), "the deadline must be an unsigned int, not 0.5", (5, None)),
        (msgpack.packb([1, 0, 5, "t", 0, [], 1]), "the headers must be nil or a map, not an array", (5, "t")),
        (msgpack.packb([1, 0, 5, "t", 0, {1: "x"}, 1]), "a header name must be a str, not 1", (5, "t")),
        (msgpack.packb([1, 0, 5, "t", 0, {b"k": "x"}, 1]), "a header name must be a str, not a bin", (5, "t")),
        (
            b"\x97\x01\x00\x05\xa1t\x00\xc0\xa1\xff",
            "the envelope is not valid msgpack: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte",
            (5, "t"),
        ),
        (b"\x94\x01\x01\x05\x81\x90\x01", "the envelope is not valid msgpack: unhashable type: 'list'", NO_ROUTE),
    ],
)
def test_decode_refuses(envelope: ModuleType, body: bytes, message: str, route: tuple[Any, Any]) -> None:
    with pytest.raises(envelope.EnvelopeError) as caught:
        envelope.decode(body)
    assert str(caught.value) == message
    assert (caught.value.call_id, caught.value.reply_to) == route


def test_refuses_a_broken_ext_with_msgpack_reason(envelope: ModuleType) -> None:
    with pytest.raises(envelope.EnvelopeError, match=r"^the envelope is not valid msgpack: ") as caught:
        envelope.decode(b"\x97\x01\x00\x05\xc0\x00\xc0\xc7\x03\xff\x00\x00\x00")  # a timestamp of 3 bytes
    assert (caught.value.call_id, caught.value.reply_to) == (5, None)


def test_an_unknown_version_still_tells_whom_to_answer(envelope: ModuleType) -> None:
    """Forward compatibility: elements 0-3 of an invocation are the same in every version."""
    future = msgpack.packb([2, 0, 42, REPLY_TO, {"a": "new", "layout": []}, b"\xff"])
    with pytest.raises(envelope.EnvelopeError, match="unsupported envelope version 2") as caught:
        envelope.decode(future)
    assert (caught.value.call_id, caught.value.reply_to) == (42, REPLY_TO)
    # ... even when what follows is not valid msgpack
    with pytest.raises(envelope.EnvelopeError) as caught:
        envelope.decode(future[: 4 + len(str8(REPLY_TO))] + b"\xc1")
    assert (caught.value.call_id, caught.value.reply_to) == (42, REPLY_TO)


# --- Invocation and Reply -----------------------------------------------------


def test_records_are_built_by_position_or_keyword(envelope: ModuleType) -> None:
    invocation = envelope.Invocation(1, "t", 2, {"h": 1}, "x")
    assert invocation == envelope.Invocation(call_id=1, reply_to="t", deadline=2, headers={"h": 1}, payload="x")
    assert (invocation.call_id, invocation.reply_to, invocation.deadline, invocation.headers, invocation.payload) == (
        1,
        "t",
        2,
        {"h": 1},
        "x",
    )
    assert invocation != envelope.Invocation(1, "t", 2, {"h": 1}, "y")
    reply = envelope.Reply(1, True, "x")
    assert reply == envelope.Reply(call_id=1, ok=True, payload="x")
    assert reply != envelope.Reply(1, False, "x")
    assert reply != invocation and reply != (1, True, "x")
    assert hash(reply) == hash(envelope.Reply(1, True, "x"))


def test_records_are_read_only(envelope: ModuleType) -> None:
    invocation = envelope.Invocation(1, "t", 2, None, "x")
    reply = envelope.Reply(1, True, "x")
    for record, name in [(invocation, "call_id"), (invocation, "payload"), (reply, "ok"), (reply, "payload")]:
        with pytest.raises(AttributeError):
            setattr(record, name, 0)


def test_records_match_by_position(envelope: ModuleType) -> None:
    match envelope.decode(envelope.encode_reply(3, False, "no")):
        case envelope.Reply(call_id, ok, payload):
            assert (call_id, ok, payload) == (3, False, "no")
        case _:
            pytest.fail("not a Reply")


def test_twins_repr_alike() -> None:
    compiled, pure = load_twin("envelope", "c"), load_twin("envelope", "py")
    for twin in (compiled, pure):
        assert repr(twin.Invocation(1, "t", 0, {"h": b"v"}, [1.5])) == (
            "Invocation(call_id=1, reply_to='t', deadline=0, headers={'h': b'v'}, payload=[1.5])"
        )
        assert repr(twin.Reply(2, False, None)) == "Reply(call_id=2, ok=False, payload=None)"


# --- the test vectors of docs/PROTOCOL.md -------------------------------------


def protocol_vectors() -> list[tuple[bool, dict[str, Any], bytes]]:
    """``(canonical, fields, body)`` of each ``envelope-vector`` block."""
    vectors = []
    for block in re.findall(r"```envelope-vector\n(.*?)```", PROTOCOL.read_text(), re.DOTALL):
        head, hex_digits = block.split("hex:", 1)
        settings = dict(line.split(": ", 1) for line in head.strip().splitlines())
        vectors.append((settings.get("canonical") != "no", json.loads(settings["fields"]), bytes.fromhex(hex_digits)))
    return vectors


VECTORS = protocol_vectors()


def test_protocol_has_the_vectors_it_promises() -> None:
    kinds = [(fields["kind"], fields.get("ok")) for _, fields, _ in VECTORS]
    assert kinds.count(("invocation", None)) >= 3
    assert ("reply", True) in kinds and ("reply", False) in kinds and ("invalid", None) in kinds
    assert kinds.count(("batch", None)) >= 2 and kinds.count(("invalid batch", None)) >= 3


@pytest.mark.parametrize(("canonical", "fields", "body"), VECTORS, ids=[body.hex()[:24] for _, _, body in VECTORS])
def test_protocol_vector(envelope: ModuleType, canonical: bool, fields: dict[str, Any], body: bytes) -> None:
    fields = dict(fields)
    kind = fields.pop("kind")
    if kind == "batch":
        items = [bytes.fromhex(item) for item in fields["items"]]
        assert envelope.batch_items(body) == items
        for item in items:
            envelope.decode(item)  # each an envelope
        if canonical:
            assert envelope.encode_batch(items) == body
        return
    if kind == "invalid batch":
        with pytest.raises(envelope.EnvelopeError):
            envelope.batch_items(body)
        return
    assert envelope.batch_items(body) is None  # no batch
    if kind == "invalid":
        with pytest.raises(envelope.EnvelopeError) as caught:
            envelope.decode(body)
        assert (caught.value.call_id, caught.value.reply_to) == (fields["call_id"], fields["reply_to"])
        return
    record, encode = (
        (envelope.Invocation, envelope.encode_invocation)
        if kind == "invocation"
        else (envelope.Reply, envelope.encode_reply)
    )
    assert envelope.decode(body) == record(**fields)
    if canonical:
        assert encode(**fields) == body


# --- batches ----------------------------------------------------------------------


def test_a_batch_carries_its_items_in_order(envelope: ModuleType) -> None:
    items = [envelope.encode_reply(number, True, "x" * number) for number in (1, 300, 70000)] * 6
    body = envelope.encode_batch(items)
    assert body[:4] == bytes([0x93, 1, 3, 0xDC])  # 18 items: an array16
    assert envelope.batch_items(body) == items
    assert [envelope.decode(item).call_id for item in envelope.batch_items(body)] == [1, 300, 70000] * 6


def test_what_is_no_batch_is_told_apart(envelope: ModuleType) -> None:
    for body in (
        envelope.encode_reply(1, True, None),
        envelope.encode_invocation(1, None, 0, None, [1, 3]),
        b"",
        b"\xc1",
        msgpack.packb([2, 3, [b"x"]]),  # another version
        msgpack.packb([True, 3, [b"x"]]),  # true is no version
    ):
        assert envelope.batch_items(body) is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (msgpack.packb([1, 3]), "a batch has 3 elements, not 2"),
        (msgpack.packb([1, 3, []]), "a batch's items are an array of one bin at least, not an array"),
        (msgpack.packb([1, 3, {}]), "a batch's items are an array of one bin at least, not a map"),
        (msgpack.packb([1, 3, ["x"]]), "a batch item must be a bin, not a str"),
        (msgpack.packb([1, 3, [b"x"]]) + b"\x00", "1 byte after the end of the batch"),
        (msgpack.packb([1, 3, [b"xy"]])[:-1], "the batch is truncated"),
    ],
)
def test_a_bad_batch_is_refused_saying_why(envelope: ModuleType, body: bytes, message: str) -> None:
    with pytest.raises(envelope.EnvelopeError, match=re.escape(message)):
        envelope.batch_items(body)


def test_a_batch_is_made_of_bytes(envelope: ModuleType) -> None:
    with pytest.raises(ValueError, match="one item at least"):
        envelope.encode_batch([])
    with pytest.raises(TypeError, match="must be bytes, not str"):
        envelope.encode_batch([b"x", "y"])
