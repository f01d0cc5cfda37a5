"""Compiled hot paths and their pure-Python twins.

Each hot path ``NAME`` is three modules: ``NAME_c.pyx`` (Cython), ``NAME_py.py``
(the pure twin and the type source) and the selector ``NAME.py`` that the rest
of almanet imports. The choice is made once, at import:

- ``ALMANET_NO_EXTENSIONS`` set to any non-empty value selects the pure twins
  (``setup.py`` reads it the same way and then compiles nothing);
- otherwise the compiled module is used when it imports, the pure twin when it
  does not (``speedups()`` tells which, and the test suite fails on it).
"""

import importlib
import os
from types import ModuleType

NO_EXTENSIONS: bool = bool(os.environ.get("ALMANET_NO_EXTENSIONS"))
USE_EXTENSIONS: bool = not NO_EXTENSIONS

_selected: dict[str, str] = {}


def select(name: str) -> ModuleType:
    """Import the implementation of hot path ``name`` that this process uses."""
    module: ModuleType | None = None
    if USE_EXTENSIONS:
        try:
            module = importlib.import_module(f"{__name__}.{name}_c")
        except ImportError:
            module = None
    if module is None:
        module = importlib.import_module(f"{__name__}.{name}_py")
        _selected[name] = "py"
    else:
        _selected[name] = "c"
    return module


def speedups() -> dict[str, str]:
    """Which implementation each hot path uses: ``"c"`` (compiled) or ``"py"``."""
    from almanet._speedups import envelope, frames, pending  # noqa: F401  (imports register themselves)

    return dict(sorted(_selected.items()))
