"""Compiled hot paths and their pure-Python twins.

Each hot path ``NAME`` is three modules: ``NAME_c.pyx`` (Cython), ``NAME_py.py``
(the pure twin and the type source) and the selector ``NAME.py`` that the rest
of almanet imports. The selector imports each name of the API from one twin,
once, at import:

- ``ALMANET_NO_EXTENSIONS`` set to any non-empty value selects the pure twins
  (``setup.py`` reads it the same way and then compiles nothing);
- otherwise the compiled module is used when it imports, the pure twin when it
  does not (``speedups()`` tells which, and the test suite fails on it).
"""

import os

NO_EXTENSIONS: bool = bool(os.environ.get("ALMANET_NO_EXTENSIONS"))


def speedups() -> dict[str, str]:
    """Which implementation each hot path uses: ``"c"`` (compiled) or ``"py"``."""
    # Imported on call, not at the top: each selector imports this package.
    from almanet._speedups import envelope, frames, pending

    return {"envelope": envelope.IMPLEMENTATION, "frames": frames.IMPLEMENTATION, "pending": pending.IMPLEMENTATION}
