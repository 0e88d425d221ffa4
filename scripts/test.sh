#!/usr/bin/env bash
# THE test command: setup, lint, type check, then the whole pytest suite. Extra arguments go to pytest,
# e.g. scripts/test.sh tests/integration --pooler=pgbouncer
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

if command -v ruff >/dev/null 2>&1; then
    ruff check .
else
    python3 -m ruff check .
fi

python3 -m mypy pgmux bench  # type hints are checked, not only written ([tool.mypy] in pyproject.toml)

exec python3 -m pytest -q "$@"
