#!/usr/bin/env bash
# Side-by-side demo on a throwaway cluster: direct PostgreSQL, PgBouncer (when /usr/sbin/pgbouncer is
# installed; the output says so when it is not) and pgmux, same pgbench runs, one table. Arguments go to
# pgmux.demo, e.g. scripts/demo.sh --no-pgbouncer, or --duration 10 (python3 -m pgmux.demo -h lists them)
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
exec python3 -m pgmux.demo "$@"
