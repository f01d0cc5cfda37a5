"""RPC envelope codec speed: compiled twin against the pure one.

Target: encoding and decoding an invocation and its reply, str payloads,
>= 3x faster compiled than pure.
"""

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

REPLY_TO = "_almanet.reply.0123456789abcdef#ephemeral"
DEADLINE = 1_767_225_600_000


def twin(implementation: str) -> ModuleType:
    return importlib.import_module(f"almanet._speedups.envelope_{implementation}")


def call_and_reply(implementation: str) -> Callable[[], Any]:
    """One call's codec work: the caller encodes, the callee decodes and replies, the caller decodes."""
    envelope = twin(implementation)
    encode_invocation, encode_reply, decode = envelope.encode_invocation, envelope.encode_reply, envelope.decode

    def run() -> Any:
        invocation = decode(encode_invocation(1, REPLY_TO, DEADLINE, None, "Aidar"))
        return decode(encode_reply(invocation.call_id, True, f"Hello, {invocation.payload}!"))

    return run


@pytest.mark.benchmark(group="envelope encode+decode (invocation and reply, str payload)")
@pytest.mark.parametrize("implementation", ["c", "py"])
def test_envelope_round_trip(benchmark: BenchmarkFixture, implementation: str) -> None:
    reply = benchmark(call_and_reply(implementation))
    assert (reply.call_id, reply.ok, reply.payload) == (1, True, "Hello, Aidar!")
