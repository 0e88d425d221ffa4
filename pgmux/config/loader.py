"""Loading pgbouncer.ini into a Config: sections, [databases]/[users]/[peers] entries, settings.

Behaviour matches PgBouncer (checked against Debian's PgBouncer 1.18 as an oracle, and the 1.25
sources for the newer keys), except where noted:

* Section and key names are case-sensitive. Only [pgbouncer], [databases], [users] and [peers]
  exist; any other section, an unknown [pgbouncer] key, a value outside any section or a file
  without [pgbouncer] is an error. PgBouncer refuses to start on these, and a RELOAD that meets
  one logs "config file loading failed" (having already applied the lines before the bad one).
  load_config() raises instead, so a reload either applies a whole file or nothing.
* Every ``[pgbouncer]`` header resets the settings with non-NULL defaults to those defaults
  (libusual's fill_defaults()), so a second [pgbouncer] section, e.g. in an %include'd file,
  silently undoes earlier lines. We do the same, for compatibility, and record a warning.
* Database names and keys inside connection strings are case-sensitive; enum values are not.
* Integers in connection strings are strictly decimal (PgBouncer's atoi() turns ``abc`` into 0);
  a bad one is an error that names the entry and the parameter.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

from pgmux.config.connstr import parse_connstr
from pgmux.config.errors import ConfigError
from pgmux.config.ini import IniItem, parse_ini_text, read_ini_file
from pgmux.config.settings import LOAD_BALANCE_HOSTS, POOL_MODES, Settings, parse_seconds

MAIN_SECTION = "pgbouncer"
SECTIONS = ("pgbouncer", "databases", "users", "peers")
#: Database names that may not be defined in [databases] (the admin console's name).
RESERVED_DATABASES = ("pgbouncer",)


@dataclass
class DatabaseEntry:
    """One [databases] line. Fields are None where the line does not set them."""

    name: str
    dbname: str | None = None
    host: str | None = None
    port: int = 5432
    user: str | None = None
    password: str | None = None
    auth_user: str | None = None
    auth_query: str | None = None
    auth_dbname: str | None = None
    pool_size: int | None = None
    min_pool_size: int | None = None
    reserve_pool_size: int | None = None
    connect_query: str | None = None
    pool_mode: str | None = None
    query_wait_timeout: float | None = None
    load_balance_hosts: str | None = None
    max_db_connections: int | None = None
    max_db_client_connections: int | None = None
    server_lifetime: float | None = None
    client_encoding: str | None = None
    datestyle: str | None = None
    timezone: str | None = None
    application_name: str | None = None
    is_autodb: bool = False

    @property
    def hosts(self) -> list[str]:
        """The host list (``host=a,b`` means several); [] means the Unix socket."""
        if self.host is None:
            return []
        return [h.strip() for h in self.host.split(",") if h.strip()]

    @property
    def target_dbname(self) -> str:
        """The database name to ask the server for."""
        return self.dbname if self.dbname is not None else self.name


@dataclass
class UserEntry:
    """One [users] line. Fields are None where the line does not set them; timeouts in seconds."""

    name: str
    pool_mode: str | None = None
    pool_size: int | None = None
    reserve_pool_size: int | None = None
    max_user_connections: int | None = None
    max_user_client_connections: int | None = None
    query_timeout: float | None = None
    query_wait_timeout: float | None = None
    idle_transaction_timeout: float | None = None
    transaction_timeout: float | None = None
    client_idle_timeout: float | None = None


WILDCARD_PEER = "*"


@dataclass
class PeerEntry:
    """One [peers] line: where to forward cancel requests carrying this peer_id (0: the `*` line,
    for peer_ids not listed; its `host` may list several hosts, comma-separated)."""

    peer_id: int
    host: str | None = None
    port: int = 6432
    pool_size: int | None = None


@dataclass
class Config:
    """A fully parsed and validated pgbouncer.ini."""

    path: str
    settings: Settings
    databases: dict[str, DatabaseEntry]
    users: dict[str, UserEntry]
    peers: dict[int, PeerEntry]
    #: Things PgBouncer accepts silently but that are probably mistakes ("file:line: text").
    warnings: list[str] = field(default_factory=list)
    #: Every file read, the main one first, then includes in the order met.
    files: list[str] = field(default_factory=list)

    def find_database(self, name: str) -> DatabaseEntry | None:
        """The entry for a client's database name: exact, else built from ``*``, else None.

        The console's name (``pgbouncer``) never matches ``*``: PgBouncer registers the console as
        a real database, so the fallback cannot capture it.
        """
        entry = self.databases.get(name)
        if entry is not None:
            return entry
        if name in RESERVED_DATABASES:
            return None
        fallback = self.databases.get("*")
        if fallback is None:
            return None
        auto = copy.copy(fallback)
        auto.name = name
        auto.dbname = fallback.dbname if fallback.dbname is not None else name
        auto.is_autodb = True
        return auto


# --- connection-string values -------------------------------------------------------------------


def _int(raw: str) -> int:
    """A decimal integer as written in a connection string."""
    text = raw.strip()
    if not text or not (text.isdigit() or (text[0] in "+-" and text[1:].isdigit())) or not text.isascii():
        raise ConfigError(f"invalid integer value {raw!r}")
    return int(text)


def _size(raw: str) -> int | None:
    """A pool size or connection cap; negative means "not set" (PgBouncer uses -1 for that)."""
    value = _int(raw)
    return None if value < 0 else value


def _port(raw: str) -> int:
    try:
        value = _int(raw)
    except ConfigError:
        raise ConfigError(f"invalid port {raw!r}") from None
    if not 1 <= value <= 65535:
        raise ConfigError(f"invalid port {raw!r} (expected 1..65535)")
    return value


def _seconds(raw: str) -> float:
    try:
        return parse_seconds(raw)
    except ValueError:
        raise ConfigError(f"invalid time value {raw!r} (expected non-negative seconds)") from None


def _seconds_or_unset(raw: str) -> float | None:
    """query_wait_timeout: ``-1`` means "not set here, use the global value"."""
    if raw.strip() == "-1":
        return None
    return _seconds(raw)


def _choice(choices: tuple[str, ...], what: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        low = raw.lower()
        if low in choices:
            return low
        raise ConfigError(f"invalid {what} {raw!r} (expected one of: {', '.join(choices)})")

    return parse


def _str(raw: str) -> str:
    return raw


_pool_mode = _choice(POOL_MODES, "pool mode")

#: [databases] connection-string key -> (DatabaseEntry field, parser). Keys of PgBouncer 1.25+,
#: plus the 1.18 spelling ``reserve_pool``.
DATABASE_KEYS: dict[str, tuple[str, Callable[[str], object]]] = {
    "dbname": ("dbname", _str),
    "host": ("host", _str),
    "port": ("port", _port),
    "user": ("user", _str),
    "password": ("password", _str),
    "auth_user": ("auth_user", _str),
    "auth_query": ("auth_query", _str),
    "auth_dbname": ("auth_dbname", _str),
    "pool_size": ("pool_size", _size),
    "min_pool_size": ("min_pool_size", _size),
    "reserve_pool_size": ("reserve_pool_size", _size),
    "reserve_pool": ("reserve_pool_size", _size),
    "connect_query": ("connect_query", _str),
    "pool_mode": ("pool_mode", _pool_mode),
    "query_wait_timeout": ("query_wait_timeout", _seconds_or_unset),
    "load_balance_hosts": ("load_balance_hosts", _choice(LOAD_BALANCE_HOSTS, "load_balance_hosts")),
    "max_db_connections": ("max_db_connections", _size),
    "max_db_client_connections": ("max_db_client_connections", _size),
    "server_lifetime": ("server_lifetime", _seconds),
    "client_encoding": ("client_encoding", _str),
    "datestyle": ("datestyle", _str),
    "timezone": ("timezone", _str),
    "application_name": ("application_name", _str),
}

#: [users] keys -> (UserEntry field, parser).
USER_KEYS: dict[str, tuple[str, Callable[[str], object]]] = {
    "pool_mode": ("pool_mode", _pool_mode),
    "pool_size": ("pool_size", _size),
    "reserve_pool_size": ("reserve_pool_size", _size),
    "reserve_pool": ("reserve_pool_size", _size),
    "max_user_connections": ("max_user_connections", _size),
    "max_user_client_connections": ("max_user_client_connections", _size),
    "query_timeout": ("query_timeout", _seconds),
    "query_wait_timeout": ("query_wait_timeout", _seconds_or_unset),
    "idle_transaction_timeout": ("idle_transaction_timeout", _seconds),
    "transaction_timeout": ("transaction_timeout", _seconds),
    "client_idle_timeout": ("client_idle_timeout", _seconds),
}

#: [peers] keys -> (PeerEntry field, parser).
PEER_KEYS: dict[str, tuple[str, Callable[[str], object]]] = {
    "host": ("host", _str),
    "port": ("port", _port),
    "pool_size": ("pool_size", _size),
}


def _fill(
    entry: object,
    item: IniItem,
    keys: dict[str, tuple[str, Callable[[str], object]]],
    unknown: str,
) -> None:
    """Apply a connection string to an entry; errors name the file, line and entry."""
    assert item.value is not None and item.key is not None
    try:
        pairs = parse_connstr(item.value)
    except ConfigError as exc:
        raise exc.located(file=item.file, line=item.line, key=item.key) from None
    for key, raw in pairs:
        spec = keys.get(key)
        if spec is None:
            raise ConfigError(f"{unknown}: {key}", file=item.file, line=item.line, key=item.key)
        attr, parse = spec
        try:
            value = parse(raw)
        except ConfigError as exc:
            raise ConfigError(f"{exc.message} for {key}", file=item.file, line=item.line, key=item.key) from None
        setattr(entry, attr, value)


def _database(item: IniItem) -> DatabaseEntry:
    assert item.key is not None
    if item.key in RESERVED_DATABASES:
        raise ConfigError(f'database name "{item.key}" is reserved', file=item.file, line=item.line, key=item.key)
    entry = DatabaseEntry(name=item.key)
    _fill(entry, item, DATABASE_KEYS, "unrecognized connection parameter")
    return entry


def _user(item: IniItem) -> UserEntry:
    assert item.key is not None
    entry = UserEntry(name=item.key)
    _fill(entry, item, USER_KEYS, "unrecognized user parameter")
    return entry


def _peer(item: IniItem) -> PeerEntry:
    assert item.key is not None
    key = item.key
    # `*` (pgmux only): where cancel keys of peers not listed go, to every address of its hosts.
    if key != WILDCARD_PEER and not (key.isascii() and key.isdigit() and 1 <= int(key) <= 65535):
        raise ConfigError(
            "ids of peers must be a number larger than 0 and at most 65535", file=item.file, line=item.line, key=key
        )
    entry = PeerEntry(peer_id=0 if key == WILDCARD_PEER else int(key))
    _fill(entry, item, PEER_KEYS, "unrecognized connection parameter")
    if entry.host is None:
        raise ConfigError(f"host was not provided for peer {key}", file=item.file, line=item.line, key=key)
    return entry


# --- the whole file -----------------------------------------------------------------------------


def load_config(path: str) -> Config:
    """Read and validate ``path`` (following %include); raise ConfigError on the first problem."""
    files: list[str] = []
    items = read_ini_file(path, files)
    return _build(path, items, files)


def load_config_text(text: str, path: str = "<string>") -> Config:
    """Like load_config() for text already in memory (tests, config checks before writing)."""
    files: list[str] = []
    items = parse_ini_text(text, path, files)
    return _build(path, items, files)


def _build(path: str, items: list[IniItem], files: list[str]) -> Config:
    settings = Settings()
    settings.set("conffile", path, source="file")  # the command-line path, as in PgBouncer
    config = Config(path=path, settings=settings, databases={}, users={}, peers={}, files=files)
    seen_main = False
    for item in items:
        section = item.section
        if item.is_section:
            if section not in SECTIONS:
                raise ConfigError(f"unknown section [{section}]", file=item.file, line=item.line, key=f"[{section}]")
            if section == MAIN_SECTION:
                reset = settings.reset_to_defaults()
                reset = [n for n in reset if n != "conffile"]
                if seen_main and reset:
                    config.warnings.append(
                        f"{item.file}:{item.line}: repeated [pgbouncer] section resets earlier settings "
                        f"to their defaults (as PgBouncer does): {', '.join(reset)}"
                    )
                seen_main = True
            continue
        assert item.key is not None and item.value is not None
        if section == MAIN_SECTION:
            try:
                settings.set(item.key, item.value, source="file")
            except ConfigError as exc:
                raise exc.located(file=item.file, line=item.line, key=item.key) from None
        elif section == "databases":
            config.databases[item.key] = _database(item)
        elif section == "users":
            config.users[item.key] = _user(item)
        else:
            peer = _peer(item)
            config.peers[peer.peer_id] = peer
    if not seen_main:
        raise ConfigError("main section [pgbouncer] missing from config file", file=path)
    return config
