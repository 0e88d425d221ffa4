#!/usr/bin/env bash
# THE test command: setup, lint, then the whole pytest suite. Extra arguments go to pytest,
# e.g. scripts/test.sh tests/integration --pooler=pgbouncer
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

if command -v ruff >/dev/null 2>&1; then
    ruff check .
else
    python3 -m ruff check .
fi

exec python3 -m pytest -q "$@"
