"""Builds the Cython speedups: every ``almanet/_speedups/*_c.pyx``.

``ALMANET_NO_EXTENSIONS`` (any non-empty value) builds a pure-Python package;
almanet reads the same variable at import. Otherwise a failed compile fails
the build, with a message that says how to install pure: there is no silent
fallback to a pure install.
"""

import os
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import BaseError, CCompilerError, ExecError, PlatformError

NO_EXTENSIONS = bool(os.environ.get("ALMANET_NO_EXTENSIONS"))

PURE_INSTALL_HINT = (
    "almanet's compiled speedups failed to build ({reason}); to install the pure-Python version"
    " set ALMANET_NO_EXTENSIONS=1: ALMANET_NO_EXTENSIONS=1 pip install almanet"
)


class BuildSpeedups(build_ext):
    """``build_ext`` that cythonizes each extension as it builds it, and turns a
    failure (no Cython, Cython's or the C compiler's errors, no compiler) into
    one message that says how to install the pure-Python version instead."""

    def run(self) -> None:
        try:
            import Cython.Build  # noqa: F401  (only whether it imports)
        except ImportError as error:
            raise BaseError(PURE_INSTALL_HINT.format(reason=f"Cython is not installed: {error}")) from error
        from Cython.Compiler.Errors import CompileError as CythonError

        try:
            super().run()
        except (CCompilerError, ExecError, PlatformError, CythonError) as error:
            reason = f"{type(error).__name__}: {str(error).rstrip('. ')}"
            raise BaseError(PURE_INSTALL_HINT.format(reason=reason)) from error

    def build_extension(self, ext: Extension) -> None:
        from Cython.Build import cythonize

        (cythonized,) = cythonize([ext], compiler_directives={"language_level": 3}, quiet=not self.verbose)
        ext.sources = cythonized.sources
        super().build_extension(ext)


def speedup_extensions() -> list[Extension]:
    sources = sorted(Path("almanet/_speedups").glob("*_c.pyx"))
    return [Extension(f"almanet._speedups.{source.stem}", [str(source)]) for source in sources]


setup(
    ext_modules=[] if NO_EXTENSIONS else speedup_extensions(),
    cmdclass={"build_ext": BuildSpeedups},
)
