#!/usr/bin/env bash
# Coverage-guided fuzzing of the compiled data path (tests/fuzz/fuzz_engine.py) under AddressSanitizer.
#
#   bash scripts/fuzz.sh [RUNS]        RUNS inputs, default 1000000
#   environment: FUZZ_CORPUS (default build/fuzz-asan/corpus), FUZZ_MAX_LEN (longest input, default 4096),
#                FUZZ_FLAGS (more libFuzzer flags)
#
# 1. installs what is missing (idempotent): clang and its compiler-rt (apt-get update first), atheris (pip);
# 2. builds the engine with PGMUX_SANITIZE=address CC=clang (AddressSanitizer + libFuzzer coverage) in a
#    copy of the tree, build/fuzz-asan/src: the in-place .so of the normal test suite is not touched, and
#    the copy is rebuilt only when a source changed;
# 3. runs atheris with the ASan runtime preloaded (atheris' asan_with_fuzzer.so), corpus in
#    build/fuzz-asan/corpus (kept between runs), crashes in build/fuzz-asan/artifacts, log in
#    build/fuzz-asan/run-PID.log (build/fuzz-asan/last.log links to the latest).
# Prints the number of inputs run, exec/s, duration and crashes. Exit status: 0 no crash, 1 crash or
# broken invariant, 3 the toolchain could not be installed (tests/reliability/test_rel_engine_fuzz.py skips).
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS="${1:-1000000}"
OUT=build/fuzz-asan
CORPUS="${FUZZ_CORPUS:-$OUT/corpus}"
MAX_LEN="${FUZZ_MAX_LEN:-4096}"
export DEBIAN_FRONTEND=noninteractive PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
fi

toolchain_failed() {
    echo "fuzz: TOOLCHAIN UNAVAILABLE: $*" >&2
    exit 3
}

apt_updated=0
apt_install() {
    if [ "$apt_updated" -eq 0 ]; then
        $SUDO apt-get update -qq || return 1
        apt_updated=1
    fi
    $SUDO apt-get install -y -qq "$@" >/dev/null
}

# ---- 1. tools
if ! command -v clang >/dev/null 2>&1; then
    echo "fuzz: installing clang"
    apt_install clang || toolchain_failed "apt-get install clang failed"
fi
CLANG_MAJOR="$(clang -dumpversion | cut -d. -f1)"
RT_DIR="$(clang -print-resource-dir)/lib/linux"
if ! compgen -G "$RT_DIR/libclang_rt.fuzzer_no_main*" >/dev/null; then
    echo "fuzz: installing libclang-rt-${CLANG_MAJOR}-dev (compiler-rt: sanitizer and fuzzer runtimes)"
    apt_install "libclang-rt-${CLANG_MAJOR}-dev" || toolchain_failed "apt-get install libclang-rt-${CLANG_MAJOR}-dev failed"
fi
if ! python3 -c 'import atheris' >/dev/null 2>&1; then
    echo "fuzz: installing atheris"
    python3 -m pip install -q atheris || toolchain_failed "pip install atheris failed"
fi
ASAN_RT="$(python3 -c 'import atheris, os; print(os.path.join(atheris.path(), "asan_with_fuzzer.so"))')"
[ -f "$ASAN_RT" ] || toolchain_failed "atheris has no $ASAN_RT"

# ---- 2. the AddressSanitizer build, in a copy of the tree (one build at a time: runs may overlap)
mkdir -p "$OUT"
exec 9>"$OUT/build.lock"
flock 9
STAMP="$( { clang --version; python3 -c 'import atheris, sys; print(sys.version)';
            find pgmux -name '*.py' -o -name '*.pyx' -o -name '*.pxd' | sort | xargs cat; cat setup.py; } \
          | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$OUT/stamp" 2>/dev/null)" != "$STAMP" ] || ! compgen -G "$OUT/src/pgmux/engine/_engine*.so" >/dev/null; then
    echo "fuzz: building the engine with AddressSanitizer in $OUT/src"
    rm -rf "$OUT/src"
    mkdir -p "$OUT/src"
    tar --exclude='*.so' --exclude='*.c' --exclude='__pycache__' -cf - setup.py pyproject.toml README.md pgmux \
        | tar -xf - -C "$OUT/src"
    if ! (cd "$OUT/src" && PGMUX_SANITIZE=address CC=clang CXX=clang++ \
            python3 setup.py -q build_ext --inplace >"../build.log" 2>&1); then
        tail -30 "$OUT/build.log" >&2
        echo "fuzz: the AddressSanitizer build failed (log: $OUT/build.log)" >&2
        exit 1
    fi
    echo "$STAMP" >"$OUT/stamp"
fi
flock -u 9

# ---- 3. fuzz
mkdir -p "$CORPUS" "$OUT/artifacts"
python3 tests/fuzz/fuzz_engine.py --make-corpus "$OUT/seeds" --make-dict "$OUT/engine.dict"
LOG="$OUT/run-$$.log"
echo "fuzz: $RUNS inputs (log $LOG)"
set +e
# detect_leaks=0: CPython itself leaks at exit by LeakSanitizer's count
LD_PRELOAD="$ASAN_RT" ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1" PYTHONPATH="$OUT/src" \
    python3 tests/fuzz/fuzz_engine.py -runs="$RUNS" -dict="$OUT/engine.dict" -max_len="$MAX_LEN" -timeout=20 -rss_limit_mb=4096 \
        -print_final_stats=1 -artifact_prefix="$OUT/artifacts/" ${FUZZ_FLAGS:-} "$CORPUS" "$OUT/seeds" \
        >"$LOG" 2>&1
status=$?
set -e
ln -sf "$(basename "$LOG")" "$OUT/last.log"
grep -a -E "engine from|INFO: Loaded|INFO: seed corpus|^#[0-9]+ +(INITED|DONE)|^Done |stat::|ERROR|Uncaught|HarnessError|Assertion|crash-|Test unit written" \
    "$LOG" | head -60 || true
crash_files="$(grep -a -oE "Test unit written to [^ ]+" "$LOG" | cut -d' ' -f5 || true)"
crashes="$(printf '%s' "$crash_files" | grep -c . || true)"
runs="$(grep -a -oE '^Done [0-9]+ runs in [0-9]+ second' "$LOG" | tail -1 || true)"
eps="$(grep -a -oE 'stat::average_exec_per_sec: *[0-9]+' "$LOG" | grep -oE '[0-9]+$' || true)"
echo "fuzz: ${runs:-no Done line} ; exec/s ${eps:-?} ; crashes: $crashes ; exit status $status ; log $LOG"
if [ "$status" -ne 0 ] || [ "$crashes" -ne 0 ]; then
    printf '%s\n' "$crash_files"
    echo "fuzz: replay one with: PYTHONPATH=$OUT/src LD_PRELOAD=$ASAN_RT ASAN_OPTIONS=detect_leaks=0 python3 tests/fuzz/fuzz_engine.py --replay FILE"
    exit 1
fi
