#!/usr/bin/env bash
# The long soak run (not part of the test suite): a mixed workload through one pgmux for --minutes (default 15),
# sampling RSS, file descriptors and server connections. Exit status 1 if a check fails.
#   bash scripts/soak.sh --minutes 15
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m tests.reliability.soak "$@"
