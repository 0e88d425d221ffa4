#!/usr/bin/env bash
# Prepare a (fresh Debian) machine for pgmux's tests and demo. Idempotent: safe to run again.
#   - PostgreSQL server binaries, psql and pgbench (the tests start a throwaway cluster)
#   - PgBouncer, the oracle the tests can also run against (optional: failure is only a warning)
#   - a C compiler and Python's headers (pgmux's engine is Cython, compiled by pip install)
#   - Chromium (Debian's), which the dashboard's browser test drives through Playwright
#   - systemd-analyze and iproute2, for the deployment recipes' tests
#   - pgmux itself, editable, with its test extras
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive

apt_updated=0
apt_install() {
    if [ "$apt_updated" -eq 0 ]; then
        $SUDO apt-get update -qq
        apt_updated=1
    fi
    $SUDO apt-get install -y -qq "$@"
}

have_initdb() {
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}

if ! command -v psql >/dev/null 2>&1 || ! command -v pgbench >/dev/null 2>&1 || ! have_initdb; then
    echo "setup: installing PostgreSQL"
    apt_install postgresql postgresql-contrib
fi

if ! command -v pgbouncer >/dev/null 2>&1 && [ ! -x /usr/sbin/pgbouncer ]; then
    echo "setup: installing PgBouncer (test oracle)"
    apt_install pgbouncer || echo "setup: WARNING: could not install pgbouncer; --pooler=pgbouncer runs will skip" >&2
fi

# The engine (pgmux/engine, Cython) is compiled at install time: a C compiler and Python's headers.
if ! command -v cc >/dev/null 2>&1 || ! python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
    echo "setup: installing a C compiler and the Python headers (the engine is compiled)"
    apt_install gcc python3-dev
fi

# The dashboard's end-to-end test drives Debian's Chromium with Playwright (tests/integration/test_dashboard.py).
if ! command -v chromium >/dev/null 2>&1; then
    echo "setup: installing Chromium (the dashboard's browser test)"
    apt_install chromium
fi

# LDAP and PAM auth tests: each test runs its own slapd (temp dir, own port); the package's own
# instance is not configured (debconf: slapd/no_configuration) and not used. PAM uses libpam's pam_unix.
if ! command -v slapd >/dev/null 2>&1 && [ ! -x /usr/sbin/slapd ] || ! command -v ldapadd >/dev/null 2>&1; then
    echo "setup: installing slapd and ldap-utils for the LDAP auth tests"
    echo "slapd slapd/no_configuration boolean true" | $SUDO debconf-set-selections
    apt_install slapd ldap-utils || echo "setup: WARNING: slapd not installed; the LDAP tests will skip" >&2
fi

# The deployment recipes' tests: systemd-analyze verifies the unit files, `ip netns` makes two
# hosts for the peers and rolling-restart tests (each skips with its reason if this fails).
if ! command -v systemd-analyze >/dev/null 2>&1 || ! command -v ip >/dev/null 2>&1; then
    echo "setup: installing systemd (systemd-analyze) and iproute2 (ip netns) for the deploy tests"
    apt_install systemd iproute2 || echo "setup: WARNING: systemd/iproute2 not installed; those tests will skip" >&2
fi

if ! python3 -m pip --version >/dev/null 2>&1; then
    echo "setup: installing pip"
    apt_install python3-pip
fi

# Debian's system Python refuses pip installs without this (PEP 668); harmless elsewhere.
export PIP_BREAK_SYSTEM_PACKAGES=1
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
if ! python3 -m pip install -q -e '.[test]'; then
    # offline or index trouble: fine if everything is already importable
    if python3 -c 'import pgmux, psycopg, asyncpg, psycopg2, pytest, pytest_asyncio, pytest_timeout, hypothesis, playwright' \
        && { command -v ruff >/dev/null 2>&1 || python3 -m ruff --version >/dev/null 2>&1; }; then
        echo "setup: WARNING: pip install failed, using the packages already installed" >&2
    else
        echo "setup: pip install -e '.[test]' failed" >&2
        exit 1
    fi
fi
echo "setup: ok"
