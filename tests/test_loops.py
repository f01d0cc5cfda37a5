"""almanet.loops: services and benchmarks on asyncio's loop or on uvloop."""

import asyncio

import pytest

from almanet import loops


async def loop_class_name() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_asyncio_is_the_default() -> None:
    assert loops.run(loop_class_name()).startswith("asyncio")


def test_uvloop_when_asked_for() -> None:
    pytest.importorskip("uvloop")
    assert loops.run(loop_class_name(), "uvloop").startswith("uvloop")


def test_an_unknown_loop_is_refused_without_leaking_the_coroutine() -> None:
    main = loop_class_name()
    with pytest.raises(ValueError, match="unknown event loop"):
        loops.run(main, "trio")  # type: ignore[arg-type]
    assert main.cr_frame is None  # closed, not left to warn "never awaited"


def test_a_service_serves_on_uvloop_when_it_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """serve() and almanet serve take uvloop unless told otherwise: docs/PERFORMANCE.md, "asyncio or uvloop"."""
    installed = __import__("importlib").util.find_spec("uvloop") is not None
    assert loops.default_loop() == ("uvloop" if installed else "asyncio")
    monkeypatch.setattr(loops.importlib.util, "find_spec", lambda name: None)
    assert loops.default_loop() == "asyncio"
