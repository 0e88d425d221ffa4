"""pgbouncer.ini + userlist.txt from ``settings.DATABASES`` (``manage.py pgmux`` and ``pgmux_config``).

One listener serves every selected entry (they must agree on HOST/PORT). Each entry's NAME gets a
``[databases]`` line pointing at its ``PGMUX["server"]``, and a ``*`` line (the first entry's server)
lets Django's test runner create, clone and drop ``test_<NAME>`` databases and reach ``postgres``
through the same pooler. The application users become ``stats_users`` so the health and metrics
views can read ``SHOW POOLS``/``SHOW STATS`` with the credentials they already have.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pgmux.django.settings import pgmux_options

__all__ = ["GeneratedConfig", "ConfigError", "build_config", "pooled_aliases"]

#: pgmux-only ``[pgbouncer]`` keys, left out of a config meant for PgBouncer.
PGMUX_ONLY_KEYS = ("pin_session_state", "pin_timeout", "workers", "metrics_listen", "max_prepared_statements",
                   "query_stats", "query_stats_max", "query_stats_metrics")
_SIMPLE = re.compile(r"^[A-Za-z0-9_.\-]+$")


class ConfigError(ValueError):
    """The selected DATABASES entries cannot be served by one generated pooler."""


@dataclass
class GeneratedConfig:
    ini: str
    userlist: str
    listen_host: str
    listen_port: int
    aliases: list[str] = field(default_factory=list)

    def write(self, directory: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``pgbouncer.ini`` and ``userlist.txt`` (mode 0600: it holds passwords) into ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        ini = d / "pgbouncer.ini"
        users = d / "userlist.txt"
        ini.write_text(self.ini)
        fd = os.open(users, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.userlist)
        os.chmod(users, 0o600)
        return ini, users


def pooled_aliases(databases: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Aliases whose entry has a PGMUX key, in settings order."""
    return [alias for alias, entry in databases.items() if entry.get("PGMUX") is not None]


def _conn_value(value: object) -> str:
    s = str(value)
    if s and not re.search(r"[\s'\\]", s):
        return s
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _db_name(name: str) -> str:
    return name if _SIMPLE.match(name) else '"' + name.replace('"', '""') + '"'


def _userlist_line(user: str, password: str) -> str:
    return '"{}" "{}"\n'.format(user.replace('"', '""'), password.replace('"', '""'))


def _ini_value(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def build_config(
    databases: Mapping[str, Mapping[str, Any]],
    aliases: Iterable[str] | None = None,
    *,
    auth_file: str = "userlist.txt",
    unix_socket_dir: str | None = None,
    flavor: str = "pgmux",
    wildcard: bool = True,
    listen_port: int | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> GeneratedConfig:
    """Config texts for the pooler serving ``aliases`` (default: every entry with a PGMUX key).

    ``flavor="pgbouncer"`` leaves pgmux-only keys out so PgBouncer accepts the file. ``overrides`` are
    ``[pgbouncer]`` keys applied last (a value of None removes a key).
    """
    if flavor not in ("pgmux", "pgbouncer"):
        raise ConfigError(f"flavor must be pgmux or pgbouncer, not {flavor!r}")
    selected = list(aliases) if aliases is not None else pooled_aliases(databases)
    if not selected:
        raise ConfigError("no DATABASES entry has a PGMUX key (use pgmux.django.database(...))")
    entries: list[tuple[str, Mapping[str, Any], dict[str, Any]]] = []
    for alias in selected:
        if alias not in databases:
            raise ConfigError(f"no DATABASES entry {alias!r}")
        entry = databases[alias]
        opts = pgmux_options(entry)
        if opts is None:
            raise ConfigError(f"DATABASES[{alias!r}] has no PGMUX key: it does not go through pgmux")
        if not entry.get("NAME"):
            raise ConfigError(f"DATABASES[{alias!r}] has no NAME")
        entries.append((alias, entry, opts))

    first_alias, first, first_opts = entries[0]
    host = str(first.get("HOST") or "127.0.0.1")
    port = int(first.get("PORT") or 6432)
    for alias, entry, _ in entries[1:]:
        if (str(entry.get("HOST") or "127.0.0.1"), int(entry.get("PORT") or 6432)) != (host, port):
            raise ConfigError(
                f"DATABASES[{alias!r}] listens at {entry.get('HOST')}:{entry.get('PORT')}, "
                f"DATABASES[{first_alias!r}] at {host}:{port}: run one pooler per address (--database)"
            )
    mode = first_opts["pool_mode"]

    db_lines: dict[str, str] = {}
    users: dict[str, str] = {}
    stats_users: list[str] = []
    admin_users: list[str] = []
    for _alias, entry, opts in entries:
        name = str(entry["NAME"])
        server = opts["server"]
        params: dict[str, Any] = {"host": server.get("host", "127.0.0.1"), "port": server.get("port", 5432),
                                  "dbname": name}
        if opts["pool_mode"] != mode:
            params["pool_mode"] = opts["pool_mode"]
        params.update(opts.get("database") or {})
        line = " ".join(f"{k}={_conn_value(v)}" for k, v in params.items() if v is not None)
        if db_lines.get(name, line) != line:
            raise ConfigError(f"database {name!r} is configured twice, differently")
        db_lines[name] = line
        user = entry.get("USER") or ""
        if not user:
            raise ConfigError(f"DATABASES[{_alias!r}] has no USER (the pooler needs one to log in)")
        if users.get(user, entry.get("PASSWORD") or "") != (entry.get("PASSWORD") or ""):
            raise ConfigError(f"user {user!r} has two different passwords in DATABASES")
        users[user] = entry.get("PASSWORD") or ""
        if user not in stats_users:
            stats_users.append(user)
        admin = opts.get("admin_user")
        if admin:
            if admin not in admin_users:
                admin_users.append(admin)
            if opts.get("admin_password") is not None:
                users[admin] = opts["admin_password"]

    lines = ["; generated by pgmux.django from settings.DATABASES " + ", ".join(a for a, _, _ in entries),
             "[databases]"]
    lines += [f"{_db_name(name)} = {line}" for name, line in db_lines.items()]
    if wildcard:
        server = first_opts["server"]
        lines.append(f"* = host={_conn_value(server.get('host', '127.0.0.1'))} port={server.get('port', 5432)}")

    listen_addr = host
    settings: dict[str, Any] = {}
    if host.startswith("/"):
        listen_addr = ""
        settings["unix_socket_dir"] = host
    elif host == "localhost":
        listen_addr = "127.0.0.1"
    settings.update({
        "listen_addr": listen_addr,
        "listen_port": listen_port or port,
        "auth_type": "scram-sha-256",
        "auth_file": auth_file,
        "pool_mode": mode,
        "stats_users": stats_users,
    })
    if admin_users:
        settings["admin_users"] = admin_users
    if unix_socket_dir is not None and "unix_socket_dir" not in settings:
        settings["unix_socket_dir"] = unix_socket_dir
    if flavor == "pgmux":
        settings["pin_session_state"] = first_opts["pin_session_state"]
        settings["max_prepared_statements"] = first_opts["max_prepared_statements"]
    settings.update(first_opts.get("settings") or {})
    for key, value in (overrides or {}).items():
        if value is None:
            settings.pop(key, None)
        else:
            settings[key] = value
    if flavor == "pgbouncer":
        for key in PGMUX_ONLY_KEYS:
            settings.pop(key, None)
    lines += ["", "[pgbouncer]"]
    lines += [f"{k} = {_ini_value(v)}" for k, v in settings.items()]
    return GeneratedConfig(
        ini="\n".join(lines) + "\n",
        userlist="".join(_userlist_line(u, p) for u, p in users.items()),
        listen_host="127.0.0.1" if listen_addr in ("", "*", "0.0.0.0") else listen_addr,
        listen_port=int(settings["listen_port"]),
        aliases=[a for a, _, _ in entries],
    )
