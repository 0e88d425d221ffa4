#!/usr/bin/env bash
# Django's own test suite through pgmux in transaction mode, in one command (docs/django.md,
# "Django's own test suite through pgmux"). Arguments go to bench.django_suite, e.g.
#   scripts/django_suite.sh                                   # backends transactions queries select_for_update
#   scripts/django_suite.sh --apps backends basic --parallel 2
#   scripts/django_suite.sh --pooler pgbouncer                # contrast: PgBouncer fails at the clone
#   scripts/django_suite.sh --pooler direct                   # baseline without a pooler
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
# tblib: without it a failure in a --parallel worker crashes the runner instead of being reported
if ! python3 -m pip install -q -e '.[django]' tblib; then
    if python3 -c 'import django, psycopg, tblib, pgmux.django' 2>/dev/null; then
        echo "django_suite: WARNING: pip install failed, using the packages already installed" >&2
    else
        echo "django_suite: pip install -e '.[django]' tblib failed" >&2
        exit 1
    fi
fi
exec python3 -m bench.django_suite "$@"
