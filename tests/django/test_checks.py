"""Each pgmux system check: one case that triggers it, one that does not (database checks for real)."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.core import checks as dj_checks
from djhelpers import SHOP, ManagedPooler, use_databases

import pgmux.django
from pgmux.django import checks
from pgmux.testing.cluster import PoolerProcess, TempCluster, free_port

pytestmark = pytest.mark.pgmux_only


def ids(messages: list[dj_checks.CheckMessage]) -> list[str]:
    return [m.id for m in messages]


def static(databases: dict[str, dict[str, Any]], **more: Any) -> list[str]:
    """Run the registered static checks (tag pgmux) against these DATABASES."""
    with use_databases(databases, checks, **more):
        return ids(dj_checks.run_checks(tags=[checks.TAG]))


def entry(**kw: Any) -> dict[str, Any]:
    kw.setdefault("port", 6432)
    return pgmux.django.database("app", "app", "secret", **kw)


def with_options(e: dict[str, Any], **options: Any) -> dict[str, Any]:
    e["OPTIONS"] = {**e["OPTIONS"], **options}
    return e


# ----------------------------------------------------------------------------------------------- static


def test_defaults_raise_nothing() -> None:
    assert static({"default": entry()}) == []
    assert static({"default": entry(pool_mode="session"), "other": entry(asgi=True, prepared_statements=True)}) == []


def test_e001_server_side_cursors_without_pinning() -> None:
    e = entry(pin_session_state="off", server_side_cursors=True)
    assert "pgmux.E001" in static({"default": e})
    assert "pgmux.E001" in static({"default": entry(pooler="pgbouncer", server_side_cursors=True)})
    assert "pgmux.E001" not in static({"default": entry(pin_session_state="off")})  # helper disables them
    assert "pgmux.E001" not in static({"default": entry(server_side_cursors=True)})  # pinned: safe
    assert "pgmux.E001" not in static({"default": entry(pool_mode="session", pin_session_state="off")})


def test_e002_w002_assume_role_in_transaction_mode() -> None:
    assert "pgmux.E002" in static({"default": with_options(entry(pin_session_state="off"), assume_role="r")})
    assert "pgmux.E002" in static({"default": with_options(entry(pin_session_state="refuse"), assume_role="r")})
    pinned = static({"default": with_options(entry(), assume_role="r")})
    assert "pgmux.W002" in pinned and "pgmux.E002" not in pinned
    session = static({"default": with_options(entry(pool_mode="session", pin_session_state="off"), assume_role="r")})
    assert "pgmux.E002" not in session and "pgmux.W002" not in session


def test_e003_prepared_statements_without_pooler_support() -> None:
    e = with_options(entry(max_prepared_statements=0), server_side_binding=True, prepare_threshold=5)
    assert "pgmux.E003" in static({"default": e})
    with pytest.raises(ValueError, match="max_prepared_statements"):
        entry(max_prepared_statements=0, prepared_statements=True)
    assert "pgmux.E003" not in static({"default": entry(prepared_statements=True)})
    assert "pgmux.E003" not in static({"default": with_options(entry(max_prepared_statements=0),
                                                                  server_side_binding=True)})


def test_e004_native_pool_with_persistent_connections() -> None:
    direct = {"ENGINE": "django.db.backends.postgresql", "NAME": "app", "CONN_MAX_AGE": 60,
              "OPTIONS": {"pool": True}}
    assert "pgmux.E004" in static({"default": direct})
    assert "pgmux.E004" not in static({"default": {**direct, "CONN_MAX_AGE": 0}})


def test_w001_double_pooling() -> None:
    e = with_options(entry(conn_max_age=0), pool={"min_size": 1})
    assert "pgmux.W001" in static({"default": e})
    with pytest.raises(ValueError, match="twice"):
        entry(options={"pool": True})
    assert "pgmux.W001" not in static({"default": entry()})


def test_w003_asgi_with_persistent_connections() -> None:
    assert "pgmux.W003" in static({"default": entry()}, ASGI_APPLICATION="project.asgi.application")
    assert "pgmux.W003" in static({"default": entry(asgi=True, conn_max_age=60)})
    assert "pgmux.W003" not in static({"default": entry(asgi=True)})  # helper: CONN_MAX_AGE=0
    assert "pgmux.W003" not in static({"default": entry()})  # WSGI: persistent is right


def test_e005_invalid_pgmux_values() -> None:
    e = entry()
    e["PGMUX"]["pool_mode"] = "transactional"
    assert "pgmux.E005" in static({"default": e})
    e = entry()
    e["PGMUX"]["max_prepared_statements"] = "many"
    assert "pgmux.E005" in static({"default": e})
    assert "pgmux.E005" not in static({"default": entry()})


def test_e006_pgmux_settings_in_options() -> None:
    assert "pgmux.E006" in static({"default": with_options(entry(), pool_mode="transaction")})
    plain = {"ENGINE": "django.db.backends.postgresql", "NAME": "app", "OPTIONS": {"PGMUX": {}}}
    assert "pgmux.E006" in static({"default": plain})
    assert "pgmux.E006" not in static({"default": with_options(entry(), sslmode="disable")})


def test_e007_untracked_startup_options() -> None:
    assert "pgmux.E007" in static({"default": with_options(entry(), options="-c statement_timeout=5s")})
    assert "pgmux.E007" not in static({"default": with_options(entry(), options="-c TimeZone=UTC --DateStyle=ISO")})
    tracked = entry(pool_settings={"track_extra_parameters": "IntervalStyle,statement_timeout"})
    assert "pgmux.E007" not in static({"default": with_options(tracked, options="-c statement_timeout=5s")})


def test_non_postgres_and_plain_entries_are_left_alone() -> None:
    sqlite = {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:", "OPTIONS": {"pool": True},
              "CONN_MAX_AGE": 60}
    plain = {"ENGINE": "django.db.backends.postgresql", "NAME": "app", "CONN_MAX_AGE": 60, "OPTIONS": {}}
    assert static({"default": sqlite, "pg": plain}) == []


# ----------------------------------------------------------------------------------------------- database


def db_checks(databases: dict[str, dict[str, Any]], alias: str = "default") -> list[dj_checks.CheckMessage]:
    with use_databases(databases, checks):
        return dj_checks.run_checks(tags=[checks.TAG], databases=[alias])


def shop_entry(port: int, **kw: Any) -> dict[str, Any]:
    kw.setdefault("options", {"sslmode": "disable"})
    return pgmux.django.database(SHOP["name"], SHOP["user"], SHOP["password"], port=port, **kw)


def test_database_checks_pass_through_manage_py_pgmux(shop_pooler: ManagedPooler) -> None:
    messages = db_checks({"default": shop_entry(shop_pooler.port)})
    assert messages == [], [str(m) for m in messages]


def test_database_checks_are_skipped_without_databases(shop_pooler: ManagedPooler) -> None:
    with use_databases({"default": shop_entry(free_port())}, checks):
        assert checks.check_pooler_connection(databases=None) == []


def test_e010_pooler_not_running() -> None:
    messages = db_checks({"default": shop_entry(free_port())})
    assert ids(messages) == ["pgmux.E010"]


def test_e013_pool_mode_mismatch(shop_pooler: ManagedPooler) -> None:
    # manage.py pgmux runs transaction mode; the entry claims session
    messages = db_checks({"default": shop_entry(shop_pooler.port, pool_mode="session")})
    assert ids(messages) == ["pgmux.E013"]
    assert "pool_mode=transaction" in messages[0].msg


def test_w010_console_unreadable(pooler: Callable[..., PoolerProcess]) -> None:
    # a pooler whose stats_users/admin_users do not include md5user
    p = pooler(pool_mode="transaction")
    e = pgmux.django.database("testdb", "md5user", "md5pass", port=p.port, options={"sslmode": "disable"})
    messages = [m for m in db_checks({"default": e}) if m.id != "pgmux.W011"]
    assert ids(messages) == ["pgmux.W010"]


def test_w011_timezone_mismatch(shop_pooler: ManagedPooler, cluster: TempCluster) -> None:
    # role shop has ALTER ROLE ... SET timezone = 'UTC'; a DATABASES TIME_ZONE of another zone differs
    messages = db_checks({"default": shop_entry(shop_pooler.port, TIME_ZONE="Europe/Paris")})
    assert ids(messages) == ["pgmux.W011"]
    assert "'UTC'" in messages[0].msg and "Europe/Paris" in messages[0].msg


class DroppingProxy:
    """A 'pooler' that forgets to relay some ParameterStatus messages (server -> client)."""

    def __init__(self, upstream: tuple[str, int], drop: set[bytes]) -> None:
        self.upstream = upstream
        self.drop = drop
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(client)
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            self.conns.append(server)
            threading.Thread(target=self._pipe, args=(client, server), daemon=True).start()
            threading.Thread(target=self._filter, args=(server, client), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def _filter(self, src: socket.socket, dst: socket.socket) -> None:
        buf = b""
        at_start = True
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                buf += data
                out = b""
                while at_start and buf[:1] == b"N":  # one-byte answer to SSLRequest/GSSENCRequest
                    out, buf = out + b"N", buf[1:]
                while len(buf) >= 5:
                    at_start = False
                    length = struct.unpack("!I", buf[1:5])[0]
                    if len(buf) < 1 + length:
                        break
                    msg, buf = buf[: 1 + length], buf[1 + length:]
                    if msg[:1] == b"S" and msg[5:].split(b"\0", 1)[0] in self.drop:
                        continue
                    out += msg
                dst.sendall(out)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """Stop listening for good: a bare close() leaves a thread blocked in accept() holding the
        listening socket open (and its port taken) for the rest of the session; shutdown() wakes it."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.acceptor.join(5)
        assert not self.acceptor.is_alive(), "the proxy's accept thread did not stop"
        for c in self.conns:
            c.close()


@pytest.fixture
def dropping_proxy(shop_pooler: ManagedPooler) -> Iterator[Callable[[set[bytes]], DroppingProxy]]:
    made: list[DroppingProxy] = []

    def make(drop: set[bytes]) -> DroppingProxy:
        proxy = DroppingProxy(("127.0.0.1", shop_pooler.port), drop)
        made.append(proxy)
        return proxy

    yield make
    for p in made:
        p.close()


def test_e011_server_version_not_relayed(dropping_proxy: Callable[[set[bytes]], DroppingProxy]) -> None:
    proxy = dropping_proxy({b"server_version"})
    found = ids(db_checks({"default": shop_entry(proxy.port)}))
    assert "pgmux.E011" in found and "pgmux.E012" not in found


def test_e012_timezone_not_relayed(dropping_proxy: Callable[[set[bytes]], DroppingProxy]) -> None:
    proxy = dropping_proxy({b"TimeZone"})
    found = ids(db_checks({"default": shop_entry(proxy.port)}))
    assert "pgmux.E012" in found and "pgmux.E011" not in found and "pgmux.W011" not in found
