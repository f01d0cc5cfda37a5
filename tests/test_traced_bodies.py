"""Traced bodies: a produced body wrapped with its trace context (docs/PROTOCOL.md, "Traced bodies")."""

from __future__ import annotations

import json
import re
from pathlib import Path

import msgpack
from hypothesis import given
from hypothesis import strategies as st

from almanet.subscription import TRACED_BODY_EXT, traced_body, untraced

PROTOCOL = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"


def test_a_traced_body_unwraps_and_anything_else_is_left_as_it_is() -> None:
    headers = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    assert untraced(traced_body(headers, b"\x01")) == (headers, b"\x01")
    assert untraced(traced_body(headers, b"x" * 70000)) == (headers, b"x" * 70000)
    others = [
        b"",
        b"\xc7",
        msgpack.packb(msgpack.ExtType(5, b"abc")),
        msgpack.packb(msgpack.ExtType(TRACED_BODY_EXT, b"\xff\xff")),
        msgpack.packb(msgpack.ExtType(TRACED_BODY_EXT, msgpack.packb([1, b""]))),
        msgpack.packb(msgpack.ExtType(TRACED_BODY_EXT, msgpack.packb([{}, "text"]))),
        msgpack.packb(msgpack.ExtType(TRACED_BODY_EXT, msgpack.packb([{"traceparent": 5}, b""]))),
        msgpack.packb(msgpack.ExtType(TRACED_BODY_EXT, msgpack.packb([{b"traceparent": "x"}, b""]))),
        traced_body(headers, b"\x01") + b"\x00",
    ]
    for body in others:
        assert untraced(body) == (None, body)


def test_the_traced_body_vectors_of_the_protocol_page() -> None:
    vectors = re.findall(r"```traced-body-vector\n(.*?)```", PROTOCOL.read_text(), re.DOTALL)
    assert vectors
    for vector in vectors:
        fields = dict(re.findall(r"^(headers|body): (.+)$", vector, re.MULTILINE))
        headers, body = json.loads(fields["headers"]), bytes.fromhex(fields["body"])
        wrapped = bytes.fromhex(vector.split("hex:", 1)[1])
        assert traced_body(headers, body) == wrapped
        assert untraced(wrapped) == (headers, body)


@given(st.binary(max_size=200))
def test_untraced_takes_any_bytes(body: bytes) -> None:
    headers, inner = untraced(body)
    assert (headers, inner) == (None, body) or (type(headers) is dict and type(inner) is bytes)


@given(st.dictionaries(st.text(max_size=20), st.text(max_size=60), max_size=4), st.binary(max_size=300))
def test_a_traced_body_comes_back_as_it_went(headers: dict[str, str], body: bytes) -> None:
    assert untraced(traced_body(headers, body)) == (headers, body)
