"""Shared fixtures: one throwaway PostgreSQL cluster per test run, and a pooler factory.

The pooler under test is pgmux by default; ``--pooler=pgbouncer`` (or ``PGMUX_TEST_POOLER=pgbouncer``)
runs the very same tests against PgBouncer, which is our oracle for behaviour and error texts.

Markers:
  ``pgmux_only``      test makes sense only for pgmux (e.g. pgmux-specific error output)
  ``pgbouncer_only``  test pins a PgBouncer behaviour pgmux does not have to copy
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pgmux.testing.cluster import PGBOUNCER_BIN, PoolerProcess, TempCluster, tail, write_config

POOLER_KINDS = ("pgmux", "pgbouncer")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--pooler",
        choices=POOLER_KINDS,
        default=None,
        help="pooler to run integration tests against (default: $PGMUX_TEST_POOLER or pgmux)",
    )
    parser.addoption(
        "--keep-cluster",
        action="store_true",
        default=False,
        help="do not delete the test cluster's directory at the end (for debugging)",
    )


def get_pooler_kind(config: pytest.Config) -> str:
    kind = config.getoption("--pooler") or os.environ.get("PGMUX_TEST_POOLER") or "pgmux"
    if kind not in POOLER_KINDS:
        raise pytest.UsageError(f"PGMUX_TEST_POOLER must be one of {POOLER_KINDS}, not {kind!r}")
    return kind


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "pgmux_only: test only makes sense against pgmux")
    config.addinivalue_line("markers", "pgbouncer_only: test pins PgBouncer-only behaviour")
    config.addinivalue_line("markers", "integration: needs PostgreSQL and a pooler subprocess")


def pytest_report_header(config: pytest.Config) -> str:
    return f"pooler under test: {get_pooler_kind(config)}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kind = get_pooler_kind(config)
    for item in items:
        if kind != "pgmux" and item.get_closest_marker("pgmux_only"):
            item.add_marker(pytest.mark.skip(reason=f"pgmux-only test (running against {kind})"))
        if kind != "pgbouncer" and item.get_closest_marker("pgbouncer_only"):
            item.add_marker(pytest.mark.skip(reason=f"PgBouncer-only test (running against {kind})"))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    """Remember each phase's report on the item so fixtures can dump logs only for failed tests."""
    rep = yield
    setattr(item, "rep_" + rep.when, rep)
    return rep


@pytest.fixture(scope="session")
def pooler_kind(pytestconfig: pytest.Config) -> str:
    """'pgmux' or 'pgbouncer'."""
    kind = get_pooler_kind(pytestconfig)
    if kind == "pgbouncer" and not os.access(PGBOUNCER_BIN, os.X_OK):
        pytest.skip(f"{PGBOUNCER_BIN} is not installed (apt-get install pgbouncer)")
    return kind


@pytest.fixture(scope="session")
def cluster(pytestconfig: pytest.Config) -> Iterator[TempCluster]:
    """One PostgreSQL cluster per test run, with md5user/scramuser/trustuser and database testdb."""
    with TempCluster(keep=pytestconfig.getoption("--keep-cluster")) as c:  # started, stopped at the end
        c.create_test_roles()
        yield c


PoolerFactory = Callable[..., PoolerProcess]


@pytest.fixture
def pooler(request: pytest.FixtureRequest, cluster: TempCluster, pooler_kind: str) -> Iterator[PoolerFactory]:
    """Factory: ``pooler(**write_config_kwargs) -> PoolerProcess`` (started, stopped at teardown).

    Extra keywords: ``kind`` (override the kind under test), ``start=False`` (return it unstarted),
    ``process_class`` (a PoolerProcess subclass to build). The pooler's log is printed when the test
    failed.
    """
    made: list[PoolerProcess] = []

    def factory(
        *,
        kind: str | None = None,
        start: bool = True,
        process_class: type[PoolerProcess] = PoolerProcess,
        **config_kwargs: Any,
    ) -> PoolerProcess:
        workdir = tempfile.mkdtemp(prefix="pgmux-pooler-")
        os.chmod(workdir, 0o755)
        ini_text, userlist_text = write_config(cluster, workdir=workdir, **config_kwargs)
        proc = process_class(kind or pooler_kind, ini_text, userlist_text, workdir)
        made.append(proc)
        if start:
            proc.start()
        return proc

    try:
        yield factory
    finally:
        failed = any(getattr(getattr(request.node, f"rep_{when}", None), "failed", False) for when in ("setup", "call"))
        for proc in made:
            proc.stop()
            if failed:
                print(f"\n--- {proc.kind} log ({proc.workdir}) ---\n{tail(proc.log_text(), 80)}")
            shutil.rmtree(proc.workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def pgbench_tables(cluster: TempCluster) -> None:
    """pgbench -i -s 1 directly on the cluster, as md5user so the tables belong to the pooled user."""
    proc = subprocess.run(
        ["pgbench", "-i", "-s", "1", "-q", cluster.dsn("md5user", "md5pass", "testdb")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
