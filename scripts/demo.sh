#!/usr/bin/env bash
# Side-by-side demo (direct PostgreSQL vs pgmux) on a throwaway cluster; arguments go to pgmux.demo,
# e.g. scripts/demo.sh --compare-pgbouncer
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
exec python3 -m pgmux.demo "$@"
