"""The settings helper, the config generator, and the health view's verdicts (in-process, real pgmux)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psycopg
import pytest
from django.test import Client
from djhelpers import use_databases

import pgmux.django
from pgmux.django import views
from pgmux.django.config import ConfigError, build_config
from pgmux.testing.cluster import PoolerProcess, free_port, ini_get

pytestmark = pytest.mark.pgmux_only


# ----------------------------------------------------------------------------------------------- helper


def test_database_defaults_for_wsgi_transaction_mode() -> None:
    e = pgmux.django.database("app", "u", "p", port=6500, server_host="db", server_port=5433)
    assert e["HOST"] == "127.0.0.1" and e["PORT"] == "6500"
    assert e["CONN_MAX_AGE"] == 60 and e["CONN_HEALTH_CHECKS"] is True
    assert e["DISABLE_SERVER_SIDE_CURSORS"] is False  # pgmux pins WITH HOLD cursors
    assert e["OPTIONS"] == {"application_name": "django"}  # no pool, no prepare_threshold, nothing pgmux-ish
    assert e["PGMUX"]["pool_mode"] == "transaction" and e["PGMUX"]["server"] == {"host": "db", "port": 5433}


def test_database_variants() -> None:
    asgi = pgmux.django.database("app", "u", asgi=True)
    assert asgi["CONN_MAX_AGE"] == 0 and asgi["CONN_HEALTH_CHECKS"] is False
    assert pgmux.django.database("app", "u", pin_session_state="off")["DISABLE_SERVER_SIDE_CURSORS"] is True
    assert pgmux.django.database("app", "u", pooler="pgbouncer")["DISABLE_SERVER_SIDE_CURSORS"] is True
    prepared = pgmux.django.database("app", "u", prepared_statements=True)["OPTIONS"]
    assert prepared["server_side_binding"] is True and prepared["prepare_threshold"] == 5
    extra = pgmux.django.database("app", "u", TIME_ZONE="Europe/Paris", TEST={"NAME": "t"}, application_name=None)
    assert extra["TIME_ZONE"] == "Europe/Paris" and extra["TEST"] == {"NAME": "t"} and extra["OPTIONS"] == {}
    with pytest.raises(ValueError):
        pgmux.django.database("app", "u", pool_mode="bogus")


def test_direct_alias() -> None:
    e = pgmux.django.database("app", "u", "p", pin_session_state="off", server_host="db", server_port=5433)
    d = pgmux.django.direct(e, mirror="default")
    assert d["HOST"] == "db" and d["PORT"] == "5433" and "PGMUX" not in d
    assert d["DISABLE_SERVER_SIDE_CURSORS"] is False and d["TEST"] == {"MIRROR": "default"}
    with pytest.raises(ValueError):
        pgmux.django.direct({"NAME": "x"})


def test_build_config_several_entries() -> None:
    a = pgmux.django.database("app", "u", "p", port=6500, database_settings={"pool_size": 10})
    b = pgmux.django.database("other db", "v", "q'\"", port=6500, pool_mode="session")
    plain = {"ENGINE": "django.db.backends.postgresql", "NAME": "x"}
    cfg = build_config({"default": a, "other": b, "plain": plain})
    assert cfg.aliases == ["default", "other"]
    assert "app = host=127.0.0.1 port=5432 dbname=app pool_size=10" in cfg.ini
    assert "\"other db\" = host=127.0.0.1 port=5432 dbname='other db' pool_mode=session" in cfg.ini
    assert ini_get(cfg.ini, "stats_users") == "u,v"
    assert cfg.userlist == '"u" "p"\n"v" "q\'"""\n'
    with pytest.raises(ConfigError, match="listens at"):
        build_config({"a": a, "b": pgmux.django.database("z", "u", "p", port=6501)})
    with pytest.raises(ConfigError, match="no PGMUX"):
        build_config({"plain": plain}, ["plain"])


# ----------------------------------------------------------------------------------------------- health view


@pytest.fixture
def small_pool(pooler: Callable[..., PoolerProcess]) -> PoolerProcess:
    return pooler(pool_mode="transaction", extra={"default_pool_size": 1, "stats_users": "md5user"})


def test_health_view_answers_503_when_clients_wait(small_pool: PoolerProcess) -> None:
    entry = pgmux.django.database("testdb", "md5user", "md5pass", port=small_pool.port, conn_max_age=0,
                                  options={"sslmode": "disable"})
    entry["PGMUX"]["health"] = {"max_wait": 0.3}
    with use_databases({"default": entry}, views):
        client = Client()
        response = client.get("/health")
        assert response.status_code == 200, response.content
        assert response.json()["databases"]["default"]["cl_waiting"] == 0

        dsn = small_pool.dsn("md5user", "md5pass")
        with psycopg.connect(dsn) as holder, psycopg.connect(dsn, autocommit=True) as waiter:
            holder.execute("SELECT 1")  # transaction open: the only server is taken
            t = threading.Thread(target=lambda: waiter.execute("SELECT 1"))
            t.start()
            time.sleep(0.8)
            response = client.get("/health")
            assert response.status_code == 503, response.content
            item = response.json()["databases"]["default"]
            assert item["cl_waiting"] >= 1 and item["maxwait_s"] > 0.3 and "round_trip_ms" not in item
            holder.rollback()
            t.join(10)
        response = client.get("/health")
        assert response.status_code == 200, response.content


def test_dashboard_url_in_settings_and_health_view() -> None:
    entry = pgmux.django.database("testdb", "md5user", "md5pass", port=free_port(), dashboard_port=9127,
                                  options={"sslmode": "disable", "connect_timeout": 2})
    assert entry["PGMUX"]["settings"]["metrics_listen"] == "127.0.0.1:9127"
    assert pgmux.django.dashboard_url(entry) == "http://127.0.0.1:9127/"
    listen_all = pgmux.django.database("testdb", "u", host="10.0.0.5", pool_settings={"metrics_listen": "*:9000"})
    assert pgmux.django.dashboard_url(listen_all) == "http://10.0.0.5:9000/"
    assert pgmux.django.dashboard_url(pgmux.django.database("testdb", "u")) is None
    assert pgmux.django.dashboard_url(pgmux.django.database("testdb", "u", pooler="pgbouncer")) is None
    with pytest.raises(ValueError):
        pgmux.django.database("testdb", "u", pooler="pgbouncer", dashboard_port=9127)
    with use_databases({"default": entry}, views):
        response = Client().get("/health")
    assert response.json()["databases"]["default"]["dashboard"] == "http://127.0.0.1:9127/"


def test_health_view_answers_503_when_the_pooler_is_down() -> None:
    entry = pgmux.django.database("testdb", "md5user", "md5pass", port=free_port(), conn_max_age=0,
                                  options={"sslmode": "disable", "connect_timeout": 2})
    with use_databases({"default": entry}, views):
        response = Client().get("/health")
    assert response.status_code == 503
    item = response.json()["databases"]["default"]
    assert item["console"].startswith("unavailable") and "OperationalError" in item["error"]


def test_metrics_view_reports_a_pooler_that_is_down() -> None:
    entry = pgmux.django.database("testdb", "md5user", "md5pass", port=free_port())
    with use_databases({"default": entry}, views):
        response = Client().get("/metrics")
    assert response.status_code == 200
    assert 'pgmux_up{pooler="127.0.0.1:' in response.content.decode() and "} 0" in response.content.decode()
