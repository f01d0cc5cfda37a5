"""Every speedup test runs against both twins through one fixture per hot path."""

import importlib
from types import ModuleType

import pytest

from almanet._speedups import NO_EXTENSIONS

IMPLEMENTATIONS = ["c", "py"]


def load_twin(name: str, implementation: str) -> ModuleType:
    """The ``c`` or ``py`` twin of hot path ``name``.

    A compiled twin that does not import is a failure, unless
    ALMANET_NO_EXTENSIONS asked for none.
    """
    if implementation == "c" and NO_EXTENSIONS:
        pytest.skip("ALMANET_NO_EXTENSIONS is set: the compiled twin is not built")
    return importlib.import_module(f"almanet._speedups.{name}_{implementation}")


@pytest.fixture(params=IMPLEMENTATIONS)
def frames(request: pytest.FixtureRequest) -> ModuleType:
    return load_twin("frames", request.param)
