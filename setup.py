"""Compiled parts of pgmux, built by `pip install .` (Cython and a C compiler are build requirements).

- pgmux.engine._engine: the data path (an epoll set of its own, C buffers, framing, link state). Required.
- pgmux.engine._querystats: per-query statistics (normalizer, bounded table) the engine adds to. Required.
- pgmux.engine._ossl: OpenSSL from C: a TLS link's records once its handshake is over, MD5. Required
  (needs no OpenSSL headers: the functions are those Python's _ssl module uses, found at run time).
- pgmux.engine._login: a login's bytes in C (startup parameters, the md5 answer). Required.
- pgmux.protocol._scan: the compiled twin of the header walker the slow path uses. Optional: without it
  pgmux uses the pure-Python walker (pgmux/protocol/scanner.py), which is the reference anyway.

Everything else is configured in pyproject.toml. PGMUX_SANITIZE=address builds with AddressSanitizer
(for the fuzzer: tests/fuzz, docs/reliability.md).
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
    def build_extension(self, ext) -> None:  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            if ext.name.startswith("pgmux.engine."):
                raise
            print(f"pgmux: optional extension {ext.name} not built ({exc})")


def extensions() -> list:
    args: list[str] = ["-O2"]
    link: list[str] = []
    if os.environ.get("PGMUX_SANITIZE") == "address":
        args = ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"]
        link = ["-fsanitize=address"]
        if "clang" in os.environ.get("CC", ""):  # coverage for libFuzzer/atheris (scripts/fuzz.sh)
            args.append("-fsanitize=fuzzer-no-link")
            link.append("-fsanitize=fuzzer-no-link")
    exts = [
        Extension("pgmux.engine._engine", ["pgmux/engine/_engine.pyx"], extra_compile_args=args,
                  extra_link_args=link),
        Extension("pgmux.engine._querystats", ["pgmux/engine/_querystats.pyx"], extra_compile_args=args,
                  extra_link_args=link),
        # OpenSSL is found at run time in the scope of Python's own _ssl module (dlopen/dlsym)
        Extension("pgmux.engine._ossl", ["pgmux/engine/_ossl.pyx"], extra_compile_args=args,
                  extra_link_args=link, libraries=["dl"]),
        Extension("pgmux.engine._login", ["pgmux/engine/_login.pyx"], extra_compile_args=args,
                  extra_link_args=link),
        Extension("pgmux.protocol._scan", ["pgmux/protocol/_scan.pyx"]),
    ]
    return cythonize(exts, quiet=True, compiler_directives={"language_level": "3"})


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
