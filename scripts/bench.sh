#!/usr/bin/env bash
# Benchmark pgmux against PgBouncer and direct PostgreSQL on a throwaway cluster; writes
# docs/benchmarks.md and docs/benchmarks.png. Arguments go to bench.run, e.g.
#   scripts/bench.sh --duration 3 --reps 1        # short run
#   scripts/bench.sh --only select-c50,idle       # some workloads (python -m bench.run -h lists them)
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
if ! python3 -m pip install -q -e '.[test,bench]'; then
    if python3 -c 'import matplotlib' 2>/dev/null; then
        echo "bench: WARNING: pip install failed, using the packages already installed" >&2
    else
        echo "bench: WARNING: could not install matplotlib; the report is written without its chart" >&2
    fi
fi
exec python3 -m bench.run "$@"
