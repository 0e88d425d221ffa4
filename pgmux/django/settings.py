"""``DATABASES`` entries for a database behind pgmux: :func:`database` and :func:`direct`.

This module imports nothing from Django, so ``settings.py`` can use it before Django is set up.

pgmux's own options live under the entry's top-level ``"PGMUX"`` key. Django copies unknown top-level
keys around untouched, whereas every ``OPTIONS`` key it does not know is handed to libpq as a connection
parameter (and then refused by libpq). Keys of ``"PGMUX"`` (all optional):

``pool_mode``                 ``session`` | ``transaction`` | ``statement`` (what the pooler runs)
``pin_session_state``         ``auto`` | ``off`` | ``refuse`` (pgmux's setting; ``off`` under PgBouncer)
``max_prepared_statements``   pooler's setting; 0 means protocol-level prepared statements are not supported
``pooler``                    ``pgmux`` (default) or ``pgbouncer`` (what listens at HOST:PORT)
``server``                    ``{"host": ..., "port": ...}``: the PostgreSQL server the pooler connects to
                              (used by ``manage.py pgmux`` / ``pgmux_config`` and by :func:`direct`)
``settings``                  more ``[pgbouncer]`` keys for the generated configuration
``database``                  more ``[databases]`` keys for this entry (``pool_size``, ``max_db_connections`` ...)
``admin_user``/``admin_password``  console credentials (default: USER/PASSWORD, made a ``stats_users`` member)
``health``                    ``{"max_wait": seconds}``: the health view answers 503 beyond this wait
``asgi``                      True when served by an ASGI server (checked against ``CONN_MAX_AGE``)
``dashboard``                 URL of the pooler's live dashboard (default: from ``settings["metrics_listen"]``)
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

__all__ = ["POOL_MODES", "PIN_MODES", "dashboard_url", "database", "direct", "pgmux_options"]

POOL_MODES = ("session", "transaction", "statement")
PIN_MODES = ("auto", "off", "refuse")
POOLERS = ("pgmux", "pgbouncer")

#: Defaults of the ``PGMUX`` key, i.e. what a pooler started by ``manage.py pgmux`` runs with.
PGMUX_DEFAULTS: dict[str, Any] = {
    "pool_mode": "transaction",
    "pin_session_state": "auto",
    "max_prepared_statements": 200,
    "pooler": "pgmux",
    "server": {"host": "127.0.0.1", "port": 5432},
    "settings": {},
    "database": {},
    "admin_user": None,
    "admin_password": None,
    "health": {"max_wait": 5.0},
    "asgi": False,
    "dashboard": None,
}

#: psycopg's own default, used when prepared statements are asked for.
DEFAULT_PREPARE_THRESHOLD = 5


def pgmux_options(entry: Mapping[str, Any]) -> dict[str, Any] | None:
    """The entry's ``PGMUX`` options merged over the defaults, or None if the entry is not behind pgmux."""
    raw = entry.get("PGMUX")
    if raw is None:
        return None
    opts = copy.deepcopy(PGMUX_DEFAULTS)
    for key, value in dict(raw).items():
        if key in ("server", "health") and isinstance(value, Mapping):
            opts[key] = {**opts[key], **value}
        else:
            opts[key] = value
    return opts


def database(
    name: str,
    user: str,
    password: str = "",
    *,
    host: str = "127.0.0.1",
    port: int = 6432,
    server_host: str = "127.0.0.1",
    server_port: int = 5432,
    pool_mode: str = "transaction",
    pin_session_state: str = "auto",
    max_prepared_statements: int = 200,
    prepared_statements: bool = False,
    server_side_cursors: bool | None = None,
    asgi: bool = False,
    conn_max_age: int | None = None,
    health_checks: bool | None = None,
    application_name: str | None = "django",
    options: Mapping[str, Any] | None = None,
    pool_settings: Mapping[str, Any] | None = None,
    database_settings: Mapping[str, Any] | None = None,
    admin_user: str | None = None,
    admin_password: str | None = None,
    pooler: str = "pgmux",
    dashboard_port: int | None = None,
    **entry: Any,
) -> dict[str, Any]:
    """A ``DATABASES`` entry for database ``name`` reached through the pooler at ``host:port``.

    What it sets, and why:

    * ``DISABLE_SERVER_SIDE_CURSORS``: False when server-side cursors are safe, i.e. session mode, or
      pgmux pinning (``pin_session_state="auto"``: a ``WITH HOLD`` cursor from ``QuerySet.iterator()``
      keeps its client on its server until it is closed). True otherwise (PgBouncer, pinning off/refuse).
      ``server_side_cursors`` overrides it.
    * ``OPTIONS["prepare_threshold"]``: None (Django's default: no prepared statements) unless
      ``prepared_statements=True``, which turns on ``server_side_binding`` and psycopg's threshold;
      refused when the pooler has none (``max_prepared_statements=0``).
    * no ``OPTIONS["pool"]``: the pooler is the pool (Django's would keep ``max_size`` server
      connections per worker process on top of it).
    * ``CONN_MAX_AGE``: 60 with ``CONN_HEALTH_CHECKS`` for WSGI (connecting to pgmux is cheap, but a
      persistent connection is cheaper and holds no PostgreSQL backend in transaction mode); 0 for ASGI,
      where each request runs in its own thread and persistent connections pile up (Django ticket #33497).
    * ``OPTIONS["application_name"]``: one fixed name, which the pooler tracks; a name per process would
      cost a ``SET`` each time a transaction lands on a server last used by another process.
    * ``dashboard_port``: the pooler (pgmux) serves its live dashboard and /metrics there
      (``metrics_listen``, on the pooler's host); ``manage.py pgmux_stats`` and the health view link to it.

    Any other keyword (``TIME_ZONE``, ``ATOMIC_REQUESTS``, ``TEST`` ...) is copied into the entry.
    """
    if pool_mode not in POOL_MODES:
        raise ValueError(f"pool_mode must be one of {POOL_MODES}, not {pool_mode!r}")
    if pin_session_state not in PIN_MODES:
        raise ValueError(f"pin_session_state must be one of {PIN_MODES}, not {pin_session_state!r}")
    if pooler not in POOLERS:
        raise ValueError(f"pooler must be one of {POOLERS}, not {pooler!r}")
    if pooler == "pgbouncer":
        pin_session_state = "off"  # PgBouncer never pins
    pooled = pool_mode != "session"
    opts: dict[str, Any] = dict(options or {})
    if "pool" in opts:
        raise ValueError("OPTIONS['pool'] behind pgmux pools twice; leave pooling to pgmux")
    if prepared_statements:
        if pooled and max_prepared_statements <= 0:
            raise ValueError("prepared_statements=True needs max_prepared_statements > 0 in transaction mode")
        opts.setdefault("server_side_binding", True)
        opts.setdefault("prepare_threshold", DEFAULT_PREPARE_THRESHOLD)
    if application_name and "application_name" not in opts:
        opts["application_name"] = application_name
    if server_side_cursors is None:
        server_side_cursors = not pooled or pin_session_state == "auto"
    if conn_max_age is None:
        conn_max_age = 0 if asgi else 60
    if health_checks is None:
        health_checks = conn_max_age != 0
    pool_settings = dict(pool_settings or {})
    dashboard = None
    if dashboard_port is not None:
        if pooler != "pgmux":
            raise ValueError("dashboard_port: the dashboard is pgmux's (pooler='pgbouncer' has none)")
        pool_settings["metrics_listen"] = f"{host}:{int(dashboard_port)}"
        dashboard = f"http://{host}:{int(dashboard_port)}/"

    result: dict[str, Any] = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": name,
        "USER": user,
        "PASSWORD": password,
        "HOST": host,
        "PORT": str(port),
        "CONN_MAX_AGE": conn_max_age,
        "CONN_HEALTH_CHECKS": health_checks,
        "DISABLE_SERVER_SIDE_CURSORS": not server_side_cursors,
        "OPTIONS": opts,
        "PGMUX": {
            "pool_mode": pool_mode,
            "pin_session_state": pin_session_state,
            "max_prepared_statements": max_prepared_statements,
            "pooler": pooler,
            "server": {"host": server_host, "port": int(server_port)},
            "settings": pool_settings,
            "database": dict(database_settings or {}),
            "admin_user": admin_user,
            "admin_password": admin_password,
            "asgi": asgi,
            "dashboard": dashboard,
        },
    }
    result.update(entry)
    return result


def dashboard_url(entry: Mapping[str, Any]) -> str | None:
    """The URL of the live dashboard of the pgmux behind ``entry`` (PGMUX["dashboard"], else from its
    ``metrics_listen`` setting), or None when it has none."""
    opts = pgmux_options(entry)
    if opts is None or opts["pooler"] != "pgmux":
        return None
    if opts.get("dashboard"):
        return str(opts["dashboard"])
    listen = str((opts.get("settings") or {}).get("metrics_listen") or "")
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        return None
    if host in ("", "*", "0.0.0.0", "::", "[::]"):
        host = str(entry.get("HOST") or "127.0.0.1")
    return f"http://{host}:{port}/"


def direct(entry: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """The same database reached straight at PostgreSQL (``PGMUX["server"]``), not through the pooler.

    For the few jobs that need a whole session: long ``LISTEN`` loops, session advisory locks held
    across transactions, or an admin alias for migrations. Server-side cursors are on again, prepared
    statements are left as configured, and ``TEST["MIRROR"]`` points at the pooled alias's test
    database when ``mirror`` (an alias name) is given in ``overrides``.
    """
    opts = pgmux_options(entry)
    if opts is None:
        raise ValueError("direct() needs an entry made by pgmux.django.database() (it has no PGMUX key)")
    mirror = overrides.pop("mirror", None)
    result = {k: copy.deepcopy(v) for k, v in entry.items() if k != "PGMUX"}
    result["HOST"] = opts["server"]["host"]
    result["PORT"] = str(opts["server"]["port"])
    result["DISABLE_SERVER_SIDE_CURSORS"] = False
    if mirror:
        result["TEST"] = {**result.get("TEST", {}), "MIRROR": mirror}
    result.update(overrides)
    return result
