"""Optional compiled header walker: built when Cython and a C compiler are available.

Everything else is configured in pyproject.toml. A failed build is not an error: pgmux then
uses the pure-Python walker (pgmux/protocol/scanner.py), which is the reference anyway.
"""

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - no compiler, no headers: fall back to pure Python
            print(f"pgmux: optional extension not built ({exc}); using the pure-Python scanner")

    def build_extension(self, ext) -> None:  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            print(f"pgmux: optional extension {ext.name} not built ({exc})")


def extensions() -> list:
    try:
        from Cython.Build import cythonize
    except ImportError:
        return []
    return cythonize(["pgmux/protocol/_scan.pyx"], quiet=True)


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
