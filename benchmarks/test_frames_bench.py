"""Frame codec speed: compiled twin, pure twin and ansq's own protocol reader.

Targets (issue 2): compiled parsing >= 20x ansq and >= 5x the pure twin on the
stream below; the pure twin >= 3x ansq.
"""

import importlib
from collections.abc import Callable
from types import ModuleType

import pytest
from ansq.tcp.protocol import Reader as AnsqReader
from pytest_benchmark.fixture import BenchmarkFixture

MESSAGE_ID = b"0123456789abcdef"
BODY = b"x" * 200
CHUNK = 64 * 1024


def twin(implementation: str) -> ModuleType:
    return importlib.import_module(f"almanet._speedups.frames_{implementation}")


def message_stream() -> list[bytes]:
    """1 MiB of message frames with 200-byte bodies, cut into 64 KiB chunks."""
    frame = twin("py").encode_message(1_700_000_000_000_000_000, 1, MESSAGE_ID, BODY)
    stream = frame * (1024 * 1024 // len(frame))
    return [stream[i : i + CHUNK] for i in range(0, len(stream), CHUNK)]


CHUNKS = message_stream()
FRAMES = sum(len(chunk) for chunk in CHUNKS) // (8 + 26 + len(BODY))


def parse_with_almanet(implementation: str) -> Callable[[], int]:
    reader_class = twin(implementation).FrameReader

    def parse() -> int:
        reader = reader_class()
        count = 0
        for chunk in CHUNKS:
            reader.feed(chunk)
            for _ in reader:
                count += 1
        return count

    return parse


def parse_with_ansq() -> int:
    reader = AnsqReader()
    count = 0
    for chunk in CHUNKS:
        reader.feed(chunk)
        while reader.get() is not None:
            count += 1
    return count


@pytest.mark.benchmark(group="parse 1 MiB of 200-byte messages in 64 KiB chunks")
@pytest.mark.parametrize("implementation", ["c", "py", "ansq"])
def test_parse_messages(benchmark: BenchmarkFixture, implementation: str) -> None:
    parse = parse_with_ansq if implementation == "ansq" else parse_with_almanet(implementation)
    assert benchmark(parse) == FRAMES


@pytest.mark.benchmark(group="encode FIN")
@pytest.mark.parametrize("implementation", ["c", "py"])
def test_encode_fin(benchmark: BenchmarkFixture, implementation: str) -> None:
    assert benchmark(twin(implementation).encode_fin, MESSAGE_ID).startswith(b"FIN ")


@pytest.mark.benchmark(group="encode PUB (200-byte body)")
@pytest.mark.parametrize("implementation", ["c", "py"])
def test_encode_pub(benchmark: BenchmarkFixture, implementation: str) -> None:
    assert benchmark(twin(implementation).encode_pub, "net.example.greeting", BODY).startswith(b"PUB ")


@pytest.mark.benchmark(group="encode MPUB (200 x 200-byte bodies)")
@pytest.mark.parametrize("implementation", ["c", "py"])
def test_encode_mpub(benchmark: BenchmarkFixture, implementation: str) -> None:
    bodies = [BODY] * 200
    assert benchmark(twin(implementation).encode_mpub, "net.example.greeting", bodies).startswith(b"MPUB ")
