"""A short run of the engine fuzzer (tests/fuzz/fuzz_engine.py) under AddressSanitizer.

scripts/fuzz.sh installs clang, compiler-rt and atheris when they are missing, builds an ASan copy of
the engine in build/fuzz-asan (not the in-place one this suite imports) and runs atheris. The test is
skipped only when that toolchain cannot be installed (fuzz.sh exits 3); a crash, a broken invariant or
a failed ASan build fails it. PGMUX_ENGINE_FUZZ_RUNS sets the number of inputs (default 20000).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNS = int(os.environ.get("PGMUX_ENGINE_FUZZ_RUNS", "20000"))


@pytest.mark.timeout(1200)  # a first run installs clang and builds the ASan copy; the run is < 60 s
def test_engine_fuzzer_short_run_under_asan(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "PYTHONPATH", "FUZZ_FLAGS")}
    # from the seeds, with short inputs: a bounded time (the long runs' corpus, build/fuzz-asan/corpus,
    # holds inputs of up to 4 KB that run ten times slower)
    env["FUZZ_CORPUS"] = str(tmp_path / "corpus")
    env["FUZZ_MAX_LEN"] = "512"
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "fuzz.sh"), str(RUNS)],
        cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=1100,
    )
    out = proc.stdout + proc.stderr
    if proc.returncode == 3:
        reason = re.search(r"TOOLCHAIN UNAVAILABLE: (.*)", out)
        pytest.skip(f"clang/atheris could not be installed: {reason.group(1) if reason else out[-300:]}")
    assert proc.returncode == 0, f"fuzz.sh failed ({proc.returncode}):\n{out[-4000:]}"
    assert re.search(rf"Done {RUNS} runs in \d+ second", out), out[-2000:]
    assert "crashes: 0" in out, out[-2000:]
