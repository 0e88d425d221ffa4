"""Fixtures for pgmux.django: the example project's database and the pooler ``manage.py pgmux`` runs.

* ``shop_db``: role ``shop`` (SCRAM, CREATEDB, ``ALTER ROLE shop SET timezone = 'UTC'`` as the guide
  recommends) and database ``shop`` on the session's cluster.
* ``shop_pooler``: ``manage.py pgmux`` of examples/djangoapp, started from settings alone (module scope).
* ``shop_migrated``: the example migrated through that pooler.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("django")

from djhelpers import ManagedPooler, start_managed_pooler  # noqa: E402

from pgmux.testing.cluster import TempCluster, tail  # noqa: E402
from pgmux.testing.djangoapp import manage  # noqa: E402


@pytest.fixture(scope="session")
def shop_db(cluster: TempCluster) -> TempCluster:
    existing = {r[0] for r in cluster.execute("SELECT rolname FROM pg_roles")}
    with cluster.connect() as conn:
        if "shop" not in existing:
            conn.execute("SET password_encryption = 'scram-sha-256'")
            conn.execute("CREATE ROLE shop LOGIN CREATEDB PASSWORD 'shop'")
            conn.execute("ALTER ROLE shop SET timezone = 'UTC'")
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'shop'").fetchone():
            conn.execute("CREATE DATABASE shop OWNER shop")
    return cluster


@pytest.fixture(scope="module")
def shop_pooler(shop_db: TempCluster, tmp_path_factory: pytest.TempPathFactory,
                request: pytest.FixtureRequest) -> Iterator[ManagedPooler]:
    mp = start_managed_pooler(shop_db, tmp_path_factory.mktemp("shop-pooler"), "--debug")
    try:
        yield mp
    finally:
        code = mp.stop()
        if request.session.testsfailed:
            print(f"\n--- manage.py pgmux log (exit {code}) ---\n{tail(mp.log_text(), 60)}")


@pytest.fixture(scope="module")
def shop_migrated(shop_pooler: ManagedPooler) -> ManagedPooler:
    """The example's tables and seed data in database ``shop``, migrated through pgmux."""
    proc = manage(shop_pooler.env, "migrate", "--noinput")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return shop_pooler
