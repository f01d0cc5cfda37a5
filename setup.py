"""Builds the Cython speedups: every ``almanet/_speedups/*_c.pyx``.

``ALMANET_NO_EXTENSIONS`` (any non-empty value) builds a pure-Python package;
almanet reads the same variable at import. Otherwise a failed compile fails
the build: there is no silent fallback to a pure install.
"""

import os
from pathlib import Path

from setuptools import Extension, setup

NO_EXTENSIONS = bool(os.environ.get("ALMANET_NO_EXTENSIONS"))


def speedup_extensions() -> list[Extension]:
    from Cython.Build import cythonize

    sources = sorted(Path("almanet/_speedups").glob("*_c.pyx"))
    extensions = [Extension(f"almanet._speedups.{source.stem}", [str(source)]) for source in sources]
    return cythonize(extensions, compiler_directives={"language_level": 3})


setup(ext_modules=[] if NO_EXTENSIONS else speedup_extensions())
