"""Startup parameters as PgBouncer 1.25 takes them (src/client.c decide_startup_pool and
set_startup_options, src/varcache.c apply_var, src/proto.c get_header).

* ``options`` holds several ``-c name=value`` / ``--name=value`` items, backslash-escaped;
  ``ignore_startup_parameters = options`` drops only the items pgmux does not track.
* A client value equal to the server's but for case, or one the server reports in its own form
  (``true`` that reads back ``on``), costs at most one SET, not one per transaction.
* A startup packet longer than pkt_buf (4096) and PostgreSQL's 10000 bytes is read whole.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import psycopg
import pytest
from helpers_tx import connect, quiet_cluster, raw_login  # noqa: F401
from pgwire import PgError, RawConn, startup_packet

from pgmux.protocol.messages import parse_error_fields
from pgmux.testing.cluster import PoolerProcess

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("quiet_cluster")]

PoolerFactory = Callable[..., PoolerProcess]
SHOW3 = "SELECT current_setting('DateStyle'), current_setting('TimeZone'), current_setting('IntervalStyle')"
FORMAT_ERROR = "unsupported options startup parameter: only '-c config=val' and '--config=val' are allowed"


def tx_pooler(pooler: PoolerFactory, **extra: object) -> PoolerProcess:
    return pooler(pool_mode="transaction", extra={"default_pool_size": 1, **extra})


@pytest.mark.pgmux_only(reason="`options=-c ...` is PgBouncer 1.20+ (1.18 refuses it)")
def test_options_with_several_items_and_escapes(pooler: PoolerFactory) -> None:
    p = tx_pooler(pooler)
    opts = r"-c    DateStyle=German,\ YMD --TimeZone=Europe/Lisbon -cIntervalStyle=iso_8601"
    with connect(p, options=opts) as conn, connect(p) as other:
        for _ in range(2):  # the values stay the client's on the shared server
            assert conn.execute(SHOW3).fetchone() == ("German, YMD", "Europe/Lisbon", "iso_8601")
            assert other.execute(SHOW3).fetchone()[1] != "Europe/Lisbon"
    escaped = r"-c T\imezone=\E\u\r\o\pe/Lisbon"
    with connect(p, options=escaped) as conn:
        assert conn.execute("SHOW TimeZone").fetchone() == ("Europe/Lisbon",)


@pytest.mark.pgmux_only(reason="`options=-c ...` is PgBouncer 1.20+ (1.18 refuses it)")
@pytest.mark.parametrize(("options", "message"), [
    ("-d", FORMAT_ERROR),
    ("-c timezone", FORMAT_ERROR),
    ("-c TimeZone=UTC ", FORMAT_ERROR),  # a trailing blank starts an empty item
    ("-c enable_seqscan=false", "unsupported startup parameter in options: enable_seqscan"),
    ("-c=", "unsupported startup parameter in options: "),  # CVE-2026-107349's input: refused, no hang
])
def test_malformed_or_unknown_options_are_refused(pooler: PoolerFactory, options: str, message: str) -> None:
    p = tx_pooler(pooler, ignore_startup_parameters="extra_float_digits")
    with RawConn(p.host, p.port) as conn, pytest.raises(PgError) as exc:
        conn.login("md5user", "testdb", "md5pass", options=options)
    assert (exc.value.message, exc.value.sqlstate) == (message, "08P01")


@pytest.mark.pgmux_only(reason="`options=-c ...` is PgBouncer 1.20+ (1.18 refuses it)")
def test_ignored_options_still_set_the_tracked_ones(pooler: PoolerFactory) -> None:
    p = tx_pooler(pooler, ignore_startup_parameters="options")
    with connect(p, options="-c enable_seqscan=false -c TimeZone=Europe/Lisbon") as conn:
        assert conn.execute("SELECT current_setting('enable_seqscan'), current_setting('TimeZone')"
                            ).fetchone() == ("on", "Europe/Lisbon")
    # an item named in ignore_startup_parameters is dropped by itself
    p2 = tx_pooler(pooler, ignore_startup_parameters="enable_seqscan")
    with connect(p2, options="-c enable_seqscan=false --TimeZone=Europe/Lisbon") as conn:
        assert conn.execute("SHOW TimeZone").fetchone() == ("Europe/Lisbon",)


def _sync_sets(p: PoolerProcess) -> list[str]:
    """The SET queries the pooler sent to bring a server to a client's parameters: both PgBouncer
    and pgmux log them at -v as ``varcache_apply: SET ...``."""
    return re.findall(r"varcache_apply: (.*)", p.log_text())


def _run_transactions(p: PoolerProcess, **params: str) -> None:
    conn = raw_login(p, **params)
    for _ in range(4):  # four transactions, each linking the (only) server anew
        assert conn.simple_query("SELECT 1") == [("1",)]
    conn.terminate()


def test_parameter_values_differing_in_case_are_not_set(pooler: PoolerFactory) -> None:
    p = tx_pooler(pooler)
    _run_transactions(p, DateStyle="iso, mdy", TimeZone="etc/utc")  # the server has "ISO, MDY", "Etc/UTC"
    assert _sync_sets(p) == []


@pytest.mark.pgmux_only(reason="PgBouncer (1.18 measured) sends SET standard_conforming_strings='true' "
                        "at every link: PostgreSQL reports no change, so its client keeps 'true'")
def test_boolean_parameter_spellings_are_equal(pooler: PoolerFactory) -> None:
    p = tx_pooler(pooler)
    _run_transactions(p, standard_conforming_strings="true")  # the server has "on"
    assert _sync_sets(p) == []


def test_a_value_the_server_rewrites_is_set_once(pooler: PoolerFactory) -> None:
    # DateStyle 'Postgres' reads back as 'Postgres, MDY': the client holds the server's form from
    # then on (PgBouncer takes it from the ParameterStatus), so the next links send nothing.
    p = tx_pooler(pooler)
    _run_transactions(p, DateStyle="Postgres")
    sets = _sync_sets(p)
    assert sets == ["SET DateStyle='Postgres';"], sets


@pytest.mark.pgmux_only(reason="startup packets longer than pkt_buf need PgBouncer 1.25's dynamic buffer")
def test_startup_packet_longer_than_pkt_buf(pooler: PoolerFactory) -> None:
    p = tx_pooler(pooler)
    opts = " ".join(["-c TimeZone=UTC"] * 1500) + " -c TimeZone=Europe/Lisbon"  # ~24 KB
    assert 20000 < len(startup_packet({"user": "md5user", "database": "testdb", "options": opts})) < 0xFFFF
    conn = raw_login(p, options=opts)
    assert conn.simple_query("SHOW TimeZone") == [("Europe/Lisbon",)]
    conn.terminate()
    # Past what a 16-bit length can say, it is a bad header, as in PgBouncer.
    with RawConn(p.host, p.port) as raw:
        raw.send(startup_packet({"user": "md5user", "database": "testdb", "options": "-c a=" + "x" * 70000}))
        kind, body = raw.read_message()
        assert kind == b"E"
        assert parse_error_fields(body)["M"].startswith("bad packet header")
    with psycopg.connect(p.dsn("md5user", "md5pass", connect_timeout=10)) as ok:
        assert ok.execute("SELECT 1").fetchone() == (1,)
