"""Selection of compiled or pure implementations."""

import json
import os
import subprocess
import sys

import pytest

import almanet
from almanet._speedups import NO_EXTENSIONS
from conftest import load_twin

HOT_PATHS = ["envelope", "frames", "pending"]


@pytest.mark.skipif(NO_EXTENSIONS, reason="ALMANET_NO_EXTENSIONS asks for the pure twins")
def test_compiled_speedups_are_loaded() -> None:
    """Guard: a build that should have compiled the speedups and did not fails here."""
    assert almanet.speedups() == dict.fromkeys(HOT_PATHS, "c")


@pytest.mark.parametrize("name", HOT_PATHS)
def test_twins_export_the_same_names(name: str) -> None:
    pure = load_twin(name, "py")
    compiled = load_twin(name, "c")
    assert sorted(compiled.__all__) == sorted(pure.__all__)
    for attribute in pure.__all__:
        assert hasattr(compiled, attribute), attribute


@pytest.mark.parametrize("name", HOT_PATHS)
def test_selector_exports_the_active_twin(name: str) -> None:
    selector = __import__(f"almanet._speedups.{name}", fromlist=["__all__"])
    active = load_twin(name, almanet.speedups()[name])
    for attribute in active.__all__:
        assert getattr(selector, attribute) is getattr(active, attribute)


def test_no_extensions_environment_selects_pure_twins() -> None:
    env = dict(os.environ, ALMANET_NO_EXTENSIONS="1")
    out = subprocess.run(
        [sys.executable, "-c", "import almanet, json; print(json.dumps(almanet.speedups()))"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(out) == dict.fromkeys(HOT_PATHS, "py")
