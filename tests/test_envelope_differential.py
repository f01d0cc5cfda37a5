"""The compiled and the pure envelope codec get the same random arguments and bodies and must agree.

Encoding: the same bytes, or the same error. Decoding: the same envelope, or
an EnvelopeError with the same text, call id and reply topic; never another
exception.
"""

from collections.abc import Callable
from functools import partial
from types import ModuleType
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import load_twin, mutate

codec_settings = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def twins() -> tuple[ModuleType, ModuleType]:
    return load_twin("envelope", "c"), load_twin("envelope", "py")


def describe(record: Any) -> tuple[Any, ...]:
    """A twin-independent view of a decoded envelope; values as msgpack bytes, so NaN equals NaN."""
    if type(record).__name__ == "Invocation":
        headers = msgpack.packb(record.headers)
        return ("invocation", record.call_id, record.reply_to, record.deadline, headers, msgpack.packb(record.payload))
    return ("reply", record.call_id, record.ok, msgpack.packb(record.payload))


def outcome(call: Callable[[], Any]) -> tuple[Any, ...]:
    try:
        result = call()
    except (TypeError, ValueError) as error:
        route = (getattr(error, "call_id", None), getattr(error, "reply_to", None))
        return ("error", type(error).__name__, str(error), *route)
    return ("ok", result if type(result) is bytes else describe(result))


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.integers(-300, 300),
    st.floats(),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=6)),
)
payloads = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=6),
        st.tuples(children, children),
        st.dictionaries(
            st.one_of(st.text(max_size=6), st.integers(-5, 5), st.binary(max_size=3)), children, max_size=6
        ),
    ),
    max_leaves=25,
)
headers = st.one_of(st.none(), st.dictionaries(st.text(max_size=8), payloads, max_size=4))


@codec_settings
@given(
    st.integers(0, 2**64 - 1), st.one_of(st.none(), st.text(max_size=85)), st.integers(0, 2**64 - 1), headers, payloads
)
def test_round_trips_agree(call_id: int, reply_to: str | None, deadline: int, header_map: Any, payload: Any) -> None:
    compiled, pure = twins()
    invocation = pure.encode_invocation(call_id, reply_to, deadline, header_map, payload)
    assert compiled.encode_invocation(call_id, reply_to, deadline, header_map, payload) == invocation
    expected = ("invocation", call_id, reply_to, deadline, msgpack.packb(header_map), msgpack.packb(payload))
    assert describe(pure.decode(invocation)) == expected
    assert describe(compiled.decode(invocation)) == expected
    for ok in (True, False):
        reply = pure.encode_reply(call_id, ok, payload)
        assert compiled.encode_reply(call_id, ok, payload) == reply
        assert (
            describe(compiled.decode(reply))
            == describe(pure.decode(reply))
            == ("reply", call_id, ok, msgpack.packb(payload))
        )


class Opaque:
    pass


anything = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=4), st.binary(max_size=4)
)
uint64_arguments = st.one_of(
    st.integers(0, 2**64 - 1), st.sampled_from([-1, 2**63 - 1, 2**63, 2**64 - 1, 2**64]), anything
)
reply_to_arguments = st.one_of(st.none(), st.text(max_size=300), st.text("é€\ud800", max_size=130), anything)
header_arguments = st.one_of(
    headers,
    st.dictionaries(st.one_of(st.text(max_size=3), st.integers()), st.one_of(payloads, st.builds(Opaque)), max_size=3),
    anything,
    st.lists(st.text(max_size=3), max_size=2),
)
payload_arguments = st.one_of(
    payloads,
    st.builds(Opaque),
    st.lists(st.one_of(payloads, st.builds(Opaque), st.integers(-(2**70), 2**70)), max_size=3),
    st.text("a\udc80", max_size=3),
    st.sets(st.integers(), max_size=2),
)


@codec_settings
@given(uint64_arguments, reply_to_arguments, uint64_arguments, header_arguments, payload_arguments)
def test_encode_invocation_agrees(call_id: Any, reply_to: Any, deadline: Any, header_map: Any, payload: Any) -> None:
    compiled, pure = twins()
    expected = outcome(lambda: pure.encode_invocation(call_id, reply_to, deadline, header_map, payload))
    assert outcome(lambda: compiled.encode_invocation(call_id, reply_to, deadline, header_map, payload)) == expected


@codec_settings
@given(uint64_arguments, st.one_of(st.booleans(), anything), payload_arguments)
def test_encode_reply_agrees(call_id: Any, ok: Any, payload: Any) -> None:
    compiled, pure = twins()
    expected = outcome(lambda: pure.encode_reply(call_id, ok, payload))
    assert outcome(lambda: compiled.encode_reply(call_id, ok, payload)) == expected


# --- bodies ---------------------------------------------------------------------

# Elements an envelope has, in the types it must have and in others, so every check is reached.
field_values = st.one_of(
    st.sampled_from([0, 1, 2, 3]),
    st.integers(-(2**63), 2**64 - 1),
    st.none(),
    st.text(max_size=6),
    payloads,
)


@st.composite
def arrays(draw: st.DrawFn) -> bytes:
    """msgpack arrays shaped like envelopes: right or wrong version, kind, length and fields."""
    version = draw(st.one_of(st.just(1), st.just(1), field_values))
    kind = draw(st.one_of(st.sampled_from([0, 1, 2]), field_values))
    length = draw(st.sampled_from([7, 4, 7, 4, 0, 1, 2, 3, 5, 6, 8]))
    elements = [version, kind, *draw(st.lists(field_values, min_size=length, max_size=length))][:length]
    return msgpack.packb(elements)


@st.composite
def canonical(draw: st.DrawFn) -> bytes:
    pure = load_twin("envelope", "py")
    call_id = draw(st.integers(0, 2**64 - 1))
    if draw(st.booleans()):
        reply_to = draw(st.one_of(st.none(), st.text(max_size=20)))
        return pure.encode_invocation(call_id, reply_to, draw(st.integers(0, 2**64 - 1)), draw(headers), draw(payloads))
    return pure.encode_reply(call_id, draw(st.booleans()), draw(payloads))


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    body = draw(st.one_of(st.binary(max_size=64), arrays(), canonical()))
    return mutate(draw, body)


def test_every_cut_agrees() -> None:
    """Each envelope cut at every byte, and each header byte alone, exhaustively."""
    compiled, pure = twins()
    whole = [
        pure.encode_invocation(2**64 - 1, "_almanet.reply.0123456789abcdef#ephemeral", 1, {"h": [1.5, b"x"]}, "Aidar"),
        pure.encode_reply(1, False, ["denied", [-1, 2**63, None, True], {"k": 0.25}]),
        msgpack.packb([1, 0, 5, "t", 70000, {"a": {"b": 1}}, [b"x" * 300, "y" * 300]]),
        b"\xdc\x00\x04\x01\x01\xd3" + bytes(8) + b"\xca\x3f\xc0\x00\x00",
        b"\xdd\x00\x00\x00\x04\x01\x02\xcd\x01\x00\xdb\x00\x00\x00\x01x",
    ]
    bodies = [body[:cut] for body in whole for cut in range(len(body) + 1)]
    bodies += [bytes([type_byte]) + tail for type_byte in range(256) for tail in (b"", b"\x01", b"\xff" * 9)]
    for body in bodies:
        assert outcome(partial(compiled.decode, body)) == outcome(partial(pure.decode, body)), body.hex()


@codec_settings
@given(bodies(), st.sampled_from([bytes, bytearray, memoryview]))
def test_decoders_agree(body: bytes, container: Callable[[bytes], Any]) -> None:
    compiled, pure = twins()
    expected = outcome(lambda: pure.decode(body))
    assert outcome(lambda: compiled.decode(container(body))) == expected
    assert outcome(lambda: pure.decode(container(body))) == expected
    if expected[0] == "error":
        assert expected[1] == "EnvelopeError"


# --- batches --------------------------------------------------------------------


def batch_outcome(call: Callable[[], Any]) -> tuple[Any, ...]:
    try:
        return ("ok", call())
    except (TypeError, ValueError) as error:
        return ("error", type(error).__name__, str(error))


@st.composite
def batches(draw: st.DrawFn) -> bytes:
    """Batch envelopes, good or mutated, and msgpack arrays shaped like them."""
    pure = load_twin("envelope", "py")
    items = draw(st.lists(st.one_of(canonical(), st.binary(max_size=300)), min_size=1, max_size=20))
    shaped = msgpack.packb([1, 3, draw(st.one_of(st.just(items), st.lists(field_values, max_size=3)))])
    return mutate(draw, draw(st.sampled_from([pure.encode_batch(items), shaped])))


@codec_settings
@given(st.one_of(batches(), bodies()), st.sampled_from([bytes, bytearray, memoryview]))
def test_batch_readers_agree(body: bytes, container: Callable[[bytes], Any]) -> None:
    compiled, pure = twins()
    expected = batch_outcome(lambda: pure.batch_items(body))
    assert batch_outcome(lambda: compiled.batch_items(container(body))) == expected
    assert batch_outcome(lambda: pure.batch_items(container(body))) == expected
    if expected[0] == "error":
        assert expected[1] == "EnvelopeError"


def test_every_cut_of_a_batch_agrees() -> None:
    compiled, pure = twins()
    items = [pure.encode_reply(1, True, "x" * 300), pure.encode_reply(2, False, None), b"", b"\x01" * 70000]
    for whole in (pure.encode_batch(items), pure.encode_batch(items[:1]), pure.encode_batch(items * 6)):
        for cut in range(min(len(whole), 400) + 1):
            body = whole[:cut]
            assert batch_outcome(partial(compiled.batch_items, body)) == batch_outcome(
                partial(pure.batch_items, body)
            ), body.hex()


@codec_settings
@given(st.lists(st.binary(max_size=300), max_size=20), st.sampled_from([0, 255, 256, 65535, 65536]))
def test_batch_writers_agree(items: list[bytes], big: int) -> None:
    """Items of every size class (bin8, bin16, bin32), as many as an array16 needs."""
    compiled, pure = twins()
    items = [*items, bytes(big)] * (2 if big < 300 else 1)
    assert batch_outcome(lambda: compiled.encode_batch(items)) == batch_outcome(lambda: pure.encode_batch(items))
    assert pure.batch_items(compiled.encode_batch(items)) == items
