"""System checks for Django behind pgmux (ids ``pgmux.E0xx`` errors, ``pgmux.W0xx`` warnings).

Static checks (every ``manage.py`` command) read ``settings.DATABASES``:

=========== ============================================================================================
pgmux.E001  transaction/statement pooling with server-side cursors while pinning is off (or PgBouncer)
pgmux.E002  ``OPTIONS["assume_role"]`` in transaction/statement mode without pinning (role leaks / refused)
pgmux.W002  ``OPTIONS["assume_role"]`` in transaction/statement mode with pinning: every connection pinned
pgmux.E003  ``server_side_binding`` + ``prepare_threshold`` while the pooler has no prepared statements
pgmux.E004  ``OPTIONS["pool"]`` with ``CONN_MAX_AGE`` != 0 (Django only raises at the first query)
pgmux.W001  ``OPTIONS["pool"]`` behind pgmux (two pools: workers x max_size server connections)
pgmux.W003  ASGI with persistent connections (``CONN_MAX_AGE`` != 0; Django ticket #33497)
pgmux.E005  invalid ``PGMUX`` option value
pgmux.E006  pgmux options inside ``OPTIONS`` (handed to libpq, which refuses them)
pgmux.E007  ``OPTIONS["options"]`` sets a parameter the pooler does not track (it refuses the login)
=========== ============================================================================================

Database checks (``check --database ALIAS``, ``migrate``, the test runner) connect through pgmux:

=========== ============================================================================================
pgmux.E010  cannot connect through the pooler
pgmux.E011  the pooler does not relay ``server_version`` (Django then refuses the server)
pgmux.E012  the pooler does not relay ``TimeZone`` (Django then sets it on every connection)
pgmux.E013  the pooler's pool mode differs from ``PGMUX["pool_mode"]`` (the other checks assume the latter)
pgmux.W010  the pooler's console cannot be read, so the pool mode is not verified
pgmux.W011  server ``TimeZone`` differs from Django's: a ``set_config`` round trip on every new connection
=========== ============================================================================================
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from django.conf import settings
from django.core import checks
from django.db import connections

from pgmux.django.settings import PIN_MODES, POOL_MODES, POOLERS, pgmux_options

TAG = "pgmux"
BUILTIN_TRACKED = ("client_encoding", "DateStyle", "TimeZone", "standard_conforming_strings", "application_name")
#: keys that belong in PGMUX, not OPTIONS
PGMUX_KEYS_IN_OPTIONS = ("pgmux", "PGMUX", "pool_mode", "pin_session_state", "max_prepared_statements", "pooler")
ASGI_APPS = ("daphne", "channels")


def _is_postgres(entry: Mapping[str, Any]) -> bool:
    engine = str(entry.get("ENGINE", ""))
    return "postgresql" in engine or "postgis" in engine


def _conn_max_age(entry: Mapping[str, Any]) -> int | None:
    return entry.get("CONN_MAX_AGE", 0)


def _asgi(opts: Mapping[str, Any] | None) -> bool:
    if getattr(settings, "ASGI_APPLICATION", None):
        return True
    if any(app == name or app.startswith(name + ".") for app in settings.INSTALLED_APPS for name in ASGI_APPS):
        return True
    return bool(opts and opts.get("asgi"))


def _options_params(value: str) -> list[str]:
    """Parameter names set by a libpq ``options`` string (``-c a=b``, ``-ca=b``, ``--a=b``)."""
    names = []
    words = value.split()
    i = 0
    while i < len(words):
        w = words[i]
        if w == "-c" and i + 1 < len(words):
            kv, i = words[i + 1], i + 2
        elif (w.startswith("-c") and len(w) > 2) or w.startswith("--"):
            kv, i = w[2:], i + 1
        else:
            names.append(w)
            i += 1
            continue
        names.append(kv.partition("=")[0].replace("-", "_"))
    return names


def _setting_list(opts: Mapping[str, Any], key: str, default: str = "") -> list[str]:
    value = (opts.get("settings") or {}).get(key, default)
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v) for v in value]


@checks.register(TAG)
def check_databases(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    errors: list[checks.CheckMessage] = []
    for alias, entry in settings.DATABASES.items():
        errors += check_entry(alias, entry)
    return errors


def check_entry(alias: str, entry: Mapping[str, Any]) -> list[checks.CheckMessage]:
    """Static checks of one DATABASES entry."""
    if not _is_postgres(entry):
        return []
    out: list[checks.CheckMessage] = []
    obj = f"DATABASES[{alias!r}]"
    options = entry.get("OPTIONS") or {}
    age = _conn_max_age(entry)
    opts = pgmux_options(entry)

    if options.get("pool") and age != 0:
        out.append(checks.Error(
            f"{obj} uses OPTIONS['pool'] with CONN_MAX_AGE={age!r}; Django raises "
            "\"Pooling doesn't support persistent connections\" only at the first query.",
            hint="Set CONN_MAX_AGE to 0 with the native pool (or drop the pool behind pgmux).",
            obj=obj, id="pgmux.E004"))
    if age != 0 and _asgi(opts):
        out.append(checks.Warning(
            f"{obj} keeps connections open (CONN_MAX_AGE={age!r}) under ASGI: each request runs its queries in "
            "its own thread, so persistent connections pile up (one per thread, Django ticket #33497).",
            hint="Set CONN_MAX_AGE to 0 (pgmux.django.database(..., asgi=True) does) and let pgmux pool.",
            obj=obj, id="pgmux.W003"))
    misplaced = [k for k in PGMUX_KEYS_IN_OPTIONS if k in options]
    if misplaced:
        out.append(checks.Error(
            f"{obj}['OPTIONS'] holds pgmux settings {misplaced}; Django hands every OPTIONS key to libpq.",
            hint="Put pgmux settings under the entry's top-level 'PGMUX' key.", obj=obj, id="pgmux.E006"))
    if opts is None:
        return out

    invalid = [f"{key}={opts[key]!r} (one of {', '.join(choices)})"
               for key, choices in (("pool_mode", POOL_MODES), ("pin_session_state", PIN_MODES), ("pooler", POOLERS))
               if opts[key] not in choices]
    mps = opts["max_prepared_statements"]
    if not isinstance(mps, int) or isinstance(mps, bool) or mps < 0:
        invalid.append(f"max_prepared_statements={mps!r} (an integer >= 0)")
    if invalid:
        out.append(checks.Error(f"{obj}['PGMUX'] has invalid values: {'; '.join(invalid)}.", obj=obj,
                                id="pgmux.E005"))
        return out

    pooled = opts["pool_mode"] != "session"
    pinning = opts["pin_session_state"] == "auto" and opts["pooler"] == "pgmux"
    mode = opts["pool_mode"]

    if pooled and not entry.get("DISABLE_SERVER_SIDE_CURSORS") and not pinning:
        why = "PgBouncer" if opts["pooler"] == "pgbouncer" else f"pin_session_state={opts['pin_session_state']}"
        out.append(checks.Error(
            f"{obj}: {mode} pooling with server-side cursors and no pinning ({why}): QuerySet.iterator() "
            "declares WITH HOLD cursors whose FETCH lands on another server connection "
            "(cursor \"_django_curs_...\" does not exist / already exists).",
            hint="Set DISABLE_SERVER_SIDE_CURSORS=True, or run pgmux with pin_session_state=auto.",
            obj=obj, id="pgmux.E001"))

    role = options.get("assume_role")
    if pooled and role:
        if pinning:
            out.append(checks.Warning(
                f"{obj}: OPTIONS['assume_role']={role!r} in {mode} mode: Django's SET ROLE pins every "
                "connection to one server for its whole life, so pgmux pools nothing for this alias.",
                hint=f"Drop assume_role and run ALTER ROLE {entry.get('USER')} IN DATABASE {entry.get('NAME')} "
                f"SET role = '{role}' (applies at server login, no pinning).",
                obj=obj, id="pgmux.W002"))
        else:
            what = ("pgmux refuses the SET ROLE (pin_session_state=refuse)" if opts["pin_session_state"] == "refuse"
                    else "the role leaks to other clients sharing the server connection")
            out.append(checks.Error(
                f"{obj}: OPTIONS['assume_role']={role!r} in {mode} mode: Django sends SET ROLE once per "
                f"connection; {what}.",
                hint=f"Use ALTER ROLE {entry.get('USER')} IN DATABASE {entry.get('NAME')} SET role = '{role}', "
                "or pin_session_state=auto.",
                obj=obj, id="pgmux.E002"))

    if (pooled and options.get("server_side_binding") and options.get("prepare_threshold") is not None
            and not mps):
        out.append(checks.Error(
            f"{obj}: server_side_binding with prepare_threshold={options.get('prepare_threshold')!r} in {mode} "
            "mode, but the pooler has no protocol-level prepared statements (max_prepared_statements=0): "
            "prepared statement \"_pg3_N\" does not exist.",
            hint="Set max_prepared_statements > 0 in pgmux (default 200), or OPTIONS['prepare_threshold']=None.",
            obj=obj, id="pgmux.E003"))

    if options.get("pool"):
        out.append(checks.Warning(
            f"{obj} uses OPTIONS['pool'] behind pgmux: each worker process keeps up to max_size connections "
            "to the pooler on top of pgmux's own pool.",
            hint="Remove OPTIONS['pool'] and use CONN_MAX_AGE (pgmux.django.database() sets it).",
            obj=obj, id="pgmux.W001"))

    if isinstance(options.get("options"), str):
        ignored = {p.lower() for p in _setting_list(opts, "ignore_startup_parameters")}
        if "options" not in ignored:
            tracked = {p.lower() for p in BUILTIN_TRACKED}
            tracked |= {p.lower() for p in _setting_list(opts, "track_extra_parameters", "IntervalStyle")}
            bad = [n for n in _options_params(options["options"]) if n.lower() not in tracked]
            if bad:
                out.append(checks.Error(
                    f"{obj}: OPTIONS['options'] sets {bad}, which the pooler does not track: it refuses the login "
                    "(unsupported startup parameter in options).",
                    hint="Add them to PGMUX['settings']['track_extra_parameters'], or set them with "
                    "ALTER ROLE ... SET / ALTER DATABASE ... SET instead.",
                    obj=obj, id="pgmux.E007"))
    return out


# ---------------------------------------------------------------------------------------------- database checks


@checks.register(checks.Tags.database, TAG)
def check_pooler_connection(app_configs: Any = None, databases: Iterable[str] | None = None,
                            **kwargs: Any) -> list[checks.CheckMessage]:
    if not databases:
        return []
    out: list[checks.CheckMessage] = []
    for alias in databases:
        try:
            wrapper = connections[alias]
        except Exception:  # ConnectionDoesNotExist: Django's own checks report it
            continue
        if pgmux_options(wrapper.settings_dict) is None or wrapper.vendor != "postgresql":
            continue
        out += check_pooler(alias, wrapper)
    return out


def check_pooler(alias: str, wrapper: Any) -> list[checks.CheckMessage]:
    """Connect through the pooler with the alias's own parameters; verify what Django relies on."""
    from pgmux.django import console

    entry = wrapper.settings_dict
    opts = pgmux_options(entry) or {}
    obj = f"DATABASES[{alias!r}]"
    where = f"{entry.get('HOST') or 'localhost'}:{entry.get('PORT') or 5432}"
    out: list[checks.CheckMessage] = []
    try:
        params = wrapper.get_connection_params()
        params.pop("pool", None)
        conn = wrapper.Database.connect(**params)
    except Exception as e:
        return [checks.Error(f"{obj}: cannot connect through pgmux at {where}: {str(e).strip()}",
                             hint="Is the pooler running (manage.py pgmux)?", obj=obj, id="pgmux.E010")]
    try:
        info = conn.info
        server_version = info.parameter_status("server_version")
        timezone = info.parameter_status("TimeZone")
    finally:
        conn.close()
    if not server_version:
        out.append(checks.Error(
            f"{obj}: the pooler at {where} did not relay the server_version parameter; Django reads the server "
            "version from it and refuses version 0.", obj=obj, id="pgmux.E011"))
    if not timezone:
        out.append(checks.Error(
            f"{obj}: the pooler at {where} did not relay the TimeZone parameter; Django then sets the time "
            "zone on every new connection.", obj=obj, id="pgmux.E012"))
    else:
        wanted = wrapper.timezone_name
        if timezone != wanted:
            timezone_key = str(timezone).replace("'", "''")
            out.append(checks.Warning(
                f"{obj}: the server's TimeZone is {timezone_key!r} but Django uses {wanted!r}, so every new "
                "connection runs SELECT set_config('TimeZone', ...) first (and pgmux re-applies it when the "
                "client moves to a server that has the other value).",
                hint=f"ALTER ROLE {entry.get('USER')} SET timezone = '{wanted}' (or set DATABASES TIME_ZONE "
                f"to {timezone_key!r} if that is the same zone).",
                obj=obj, id="pgmux.W011"))
    try:
        actual = console.pool_mode(entry)
    except console.ConsoleError as e:
        out.append(checks.Warning(
            f"{obj}: cannot read the pooler's console to verify pool_mode={opts.get('pool_mode')}: {e}",
            hint="Add the user to stats_users (manage.py pgmux does), or set PGMUX admin_user/admin_password.",
            obj=obj, id="pgmux.W010"))
    else:
        if actual and actual != opts.get("pool_mode"):
            out.append(checks.Error(
                f"{obj}: the pooler at {where} runs pool_mode={actual} but PGMUX says "
                f"pool_mode={opts.get('pool_mode')}; the other pgmux checks relied on the latter.",
                hint=f"Set PGMUX['pool_mode'] = {actual!r} (pgmux.django.database(pool_mode=...)).",
                obj=obj, id="pgmux.E013"))
    return out

