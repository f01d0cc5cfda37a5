"""Selection of compiled or pure implementations."""

import importlib
import inspect
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

import almanet
from almanet._speedups import NO_EXTENSIONS
from helpers import load_twin

HOT_PATHS = ["envelope", "frames", "pending"]

# Every name of every hot path's API, from the pure twins (always importable).
API = [
    (name, attribute)
    for name in HOT_PATHS
    for attribute in importlib.import_module(f"almanet._speedups.{name}_py").__all__
]

# What a class has from how its twin is built (a dataclass, typing.Generic, a
# Cython extension type, the Python version: object.__getstate__ is new in
# 3.11, __firstlineno__, __static_attributes__ and a dataclass's __replace__
# in 3.13), not from the API. Whether a class takes type arguments is checked by
# subscripting it instead.
BUILD_ATTRIBUTES = {
    "__annotations__",
    "__class_getitem__",
    "__dataclass_fields__",
    "__dataclass_params__",
    "__firstlineno__",
    "__getstate__",
    "__module__",
    "__orig_bases__",
    "__parameters__",
    "__pyx_vtable__",
    "__reduce_cython__",
    "__replace__",
    "__setstate__",
    "__setstate_cython__",
    "__slots__",
    "__static_attributes__",
    "__weakref__",
}


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


def parameters(function: Callable[..., Any]) -> list[tuple[str, Any, Any]]:
    """Names, kinds and defaults of the parameters (the compiled twin has no annotations)."""
    return [
        (parameter.name, parameter.kind, parameter.default)
        for parameter in inspect.signature(function).parameters.values()
    ]


def takes_type_arguments(cls: Any) -> bool:
    try:
        cls[int]
    except TypeError:
        return False
    return True


@pytest.mark.parametrize(("name", "attribute"), API, ids=[f"{name}.{attribute}" for name, attribute in API])
def test_twins_have_the_same_api(name: str, attribute: str) -> None:
    """Functions and methods take the same parameters; classes have the same attributes.

    Constructors are left to each hot path's tests: inspect cannot read the
    signature of a Cython extension type.
    """
    pure = getattr(load_twin(name, "py"), attribute)
    compiled = getattr(load_twin(name, "c"), attribute)
    if compiled is pure:  # the compiled twin exports the pure twin's own
        return
    if not isinstance(pure, type):
        assert parameters(compiled) == parameters(pure)
        return

    def public(cls: type) -> set[str]:
        return {member for member in dir(cls) if not member.startswith("_")}

    def special(cls: type) -> set[str]:
        return {member for member in dir(cls) if member.startswith("__") and member.endswith("__")} - BUILD_ATTRIBUTES

    assert public(compiled) == public(pure)
    assert special(compiled) == special(pure)
    assert (compiled.__hash__ is None) == (pure.__hash__ is None)
    assert takes_type_arguments(compiled) == takes_type_arguments(pure)
    for member in public(pure):
        pure_member, compiled_member = getattr(pure, member), getattr(compiled, member)
        assert callable(compiled_member) == callable(pure_member), member
        if callable(pure_member):
            assert parameters(compiled_member) == parameters(pure_member), member


@pytest.mark.parametrize("name", HOT_PATHS)
def test_selector_exports_the_active_twin(name: str) -> None:
    selector = importlib.import_module(f"almanet._speedups.{name}")
    active = load_twin(name, almanet.speedups()[name])
    assert selector.__all__ == active.__all__
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
