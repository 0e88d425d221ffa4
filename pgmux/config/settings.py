"""The [pgbouncer] section: the settings table, value parsing and SHOW CONFIG formatting.

The table mirrors ``bouncer_params[]`` in PgBouncer's ``src/main.c`` (its order is SHOW CONFIG's
order) with current (1.25+) defaults, plus ``pool_idle_timeout`` and ``login_notify_message`` from
pgbouncer.md §1. Value syntax follows libusual so that files mean the same thing to both programs:

* integers use C ``strtol(..., 0)``: ``0777`` is octal and ``0x1f`` hex, for every integer
  setting (that is how ``unix_socket_mode = 0777`` works), with no trailing junk;
* times are seconds as a non-negative C float (``1.5``, ``2e3``), kept to whole microseconds and
  printed with ``%g`` as PgBouncer does (``1234567.5`` shows as ``1.23457e+06``);
* lookups (pool_mode, auth_type, sslmodes) match case-insensitively and print canonically;
* string settings are raw: no quotes are removed.

PgBouncer stores on/off settings as integers; we accept its integers and also yes/no, on/off and
true/false, and print 1/0.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pgmux.config.errors import ConfigError

_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1

# C strtol(s, &end, 0) accepting the whole string: leading whitespace, sign, hex/octal/decimal.
_C_INT_RE = re.compile(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
# C strtod() accepting the whole string (decimal forms only; inf/nan/hex floats are refused).
_C_FLOAT_RE = re.compile(r"[ \t\n\v\f\r]*[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_BOOL_WORDS = {"yes": True, "on": True, "true": True, "no": False, "off": False, "false": False}

KINDS = ("int", "float", "bool", "str", "enum", "list", "octal")

POOL_MODES = ("session", "transaction", "statement")
AUTH_TYPES = ("cert", "md5", "scram-sha-256", "plain", "trust", "any", "hba", "pam", "ldap")
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
LOAD_BALANCE_HOSTS = ("round-robin", "disable")
PIN_SESSION_STATE = ("auto", "off", "refuse")


def parse_c_int(raw: str) -> int:
    """Parse like C ``strtol(raw, &end, 0)`` with ``*end == 0`` required; ValueError otherwise."""
    m = _C_INT_RE.fullmatch(raw)
    if m is None:
        raise ValueError(raw)
    sign, digits = m.groups()
    if digits[:2] in ("0x", "0X"):
        value = int(digits[2:], 16)
    elif len(digits) > 1 and digits[0] == "0":
        value = int(digits[1:], 8)
    else:
        value = int(digits, 10)
    return -value if sign == "-" else value


def parse_seconds(raw: str) -> float:
    """Parse a non-negative time in seconds, truncated to microseconds like CF_TIME_USEC."""
    if _C_FLOAT_RE.fullmatch(raw) is None:
        raise ValueError(raw)
    value = float(raw)
    if value < 0:
        raise ValueError(raw)
    usec = int(1_000_000 * value)
    return usec / 1_000_000


def format_seconds(value: float) -> str:
    """Print a time the way PgBouncer's cf_get_time_usec() does: C ``%g`` of the seconds."""
    return f"{value:g}"


def check_host_port(raw: str) -> None:
    """An address setting's value: empty (off), or ``host:port``, ``[v6]:port``, ``*:port`` or
    ``:port`` with a port in 1..65535; ConfigError otherwise."""
    if not raw.strip():
        return
    _host, sep, port = raw.strip().rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"invalid address {raw!r} (expected host:port)")
    if not 1 <= int(port) <= 65535:
        raise ConfigError(f"port {port} out of range (1..65535) in {raw!r}")


def check_auth_type(value: str) -> None:
    """ldap and pam need an optional library (pgmux[ldap], pgmux[pam]): refused at load when it is missing."""
    if value in ("pam", "ldap"):
        from pgmux.auth.external import missing_library

        reason = missing_library(value)
        if reason is not None:
            raise ConfigError(reason)


def check_ldap_options(value: str) -> None:
    """auth_ldap_options is checked when loaded (PgBouncer only warns at each login)."""
    if value.strip():
        from pgmux.auth.external import LdapOptionsError, parse_ldap_options

        try:
            parse_ldap_options(value)
        except LdapOptionsError as exc:
            raise ConfigError(str(exc)) from None


# TLS 1.3 cipher suites as OpenSSL names them (SSL_CTX_set_ciphersuites).
TLS13_SUITES = ("TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_128_GCM_SHA256",
                "TLS_AES_128_CCM_SHA256", "TLS_AES_128_CCM_8_SHA256")


def default_tls13_suites() -> list[str]:
    """The TLS 1.3 suites this OpenSSL enables by default, in its order of preference."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    return [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.3"]


def check_tls13_ciphers(raw: str) -> None:
    """client_tls13_ciphers / server_tls13_ciphers (PgBouncer 1.25): a colon-separated list of TLS
    1.3 suites. Python's ssl module cannot set TLS 1.3 suites (it has no binding of OpenSSL's
    SSL_CTX_set_ciphersuites; set_ciphers covers TLS 1.2 and below), so only a value that changes
    nothing is accepted: empty, or the suites OpenSSL enables by default. Anything narrower is
    refused here rather than silently ignored."""
    names = [n.strip() for n in raw.split(":") if n.strip()]
    if not names:
        return
    for name in names:
        if name not in TLS13_SUITES:
            raise ConfigError(f"unknown TLS 1.3 cipher suite {name!r} (known: {':'.join(TLS13_SUITES)})")
    default = default_tls13_suites()
    if set(names) != set(default):
        raise ConfigError(
            f"{raw!r} cannot be applied: Python's ssl module cannot choose TLS 1.3 cipher suites "
            f"(no SSL_CTX_set_ciphersuites); leave it empty or list OpenSSL's default "
            f"{':'.join(default)}, or restrict TLS 1.2 with *_tls_protocols and *_tls_ciphers")


def split_list(raw: str) -> list[str]:
    """Split a comma-separated setting; blanks around items are dropped, as are empty items."""
    return [item.strip() for item in raw.split(",") if item.strip()]


@dataclass(frozen=True)
class SettingDef:
    """One [pgbouncer] setting: how to parse it, its default, and whether RELOAD/SET may change it.

    ``default`` is the typed default value. ``default_text`` is the default exactly as PgBouncer's
    table spells it (``"0777"``, ``"120"``), or None where PgBouncer has NULL; SHOW CONFIG prints
    it in the ``default`` column. ``extension`` marks pgmux-only settings.
    """

    name: str
    kind: str
    default: object
    reloadable: bool
    choices: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    default_text: str | None = None
    minimum: int | None = None
    maximum: int | None = None
    extension: bool = False
    check: Callable[[str], None] | None = None

    def __hash__(self) -> int:
        # Explicit because ``default`` may be a list; the name identifies a setting.
        return hash(self.name)

    def parse(self, raw: str) -> object:
        """Turn a raw string into the typed value; raise ConfigError (unlocated) if invalid."""
        kind = self.kind
        if kind == "str":
            if self.check is not None:
                self.check(raw)
            return raw
        if kind == "list":
            return split_list(raw)
        if kind in ("int", "octal"):
            try:
                value = parse_c_int(raw)
            except ValueError:
                raise ConfigError(f"invalid integer value {raw!r}") from None
            lo = _INT32_MIN if self.minimum is None else self.minimum
            hi = _INT32_MAX if self.maximum is None else self.maximum
            if not lo <= value <= hi:
                raise ConfigError(f"integer value {raw!r} out of range ({lo}..{hi})")
            return value
        if kind == "float":
            try:
                return parse_seconds(raw)
            except ValueError:
                raise ConfigError(f"invalid time value {raw!r} (expected non-negative seconds)") from None
        if kind == "bool":
            word = _BOOL_WORDS.get(raw.strip().lower())
            if word is not None:
                return word
            try:
                return parse_c_int(raw) != 0
            except ValueError:
                raise ConfigError(f"invalid boolean value {raw!r} (expected 0/1, yes/no, on/off, true/false)") from None
        if kind == "enum":
            low = raw.lower()
            for choice in self.choices:
                if choice == low:
                    if self.check is not None:
                        self.check(choice)
                    return choice
            raise ConfigError(f"invalid value {raw!r} (expected one of: {', '.join(self.choices)})")
        raise AssertionError(f"unknown setting kind {kind!r}")

    def format(self, value: object, raw: str | None) -> str | None:
        """The SHOW CONFIG ``value`` text: raw text for strings, PgBouncer's printf for the rest."""
        kind = self.kind
        if kind in ("str", "list"):
            return raw
        if kind == "bool":
            return "1" if value else "0"
        if kind == "float":
            assert isinstance(value, float)
            return format_seconds(value)
        return str(value)


def _def(
    name: str,
    kind: str,
    default_text: str | None,
    *,
    reloadable: bool = True,
    choices: tuple[str, ...] = (),
    aliases: tuple[str, ...] = (),
    null_default: object = None,
    minimum: int | None = None,
    maximum: int | None = None,
    extension: bool = False,
    check: Callable[[str], None] | None = None,
) -> SettingDef:
    """Build a SettingDef whose typed default is parsed from PgBouncer's default text."""
    proto = SettingDef(name, kind, None, reloadable, choices, aliases, default_text, minimum, maximum, extension,
                       check)
    default = null_default if default_text is None else proto.parse(default_text)
    return SettingDef(name, kind, default, reloadable, choices, aliases, default_text, minimum, maximum, extension,
                      check)


_AUTH_QUERY = (
    "SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END "
    "FROM pg_authid WHERE rolname=$1 AND rolcanlogin"
)
_NO = False  # reloadable=_NO reads as PgBouncer's CF_NO_RELOAD

_TABLE: tuple[SettingDef, ...] = (
    # --- PgBouncer's bouncer_params[], strcmp order (= SHOW CONFIG order) -------------------------
    _def("admin_users", "list", ""),
    _def("application_name_add_host", "bool", "0"),
    _def("auth_dbname", "str", None),
    _def("auth_file", "str", None),
    _def("auth_hba_file", "str", ""),
    _def("auth_ident_file", "str", None),
    _def("auth_ldap_options", "str", None, check=check_ldap_options),
    _def("auth_query", "str", _AUTH_QUERY),
    _def("auth_type", "enum", "md5", choices=AUTH_TYPES, check=check_auth_type),
    _def("auth_user", "str", None),
    _def("autodb_idle_timeout", "float", "3600"),
    _def("cancel_wait_timeout", "float", "10"),
    _def("client_idle_timeout", "float", "0"),
    _def("client_login_timeout", "float", "60"),
    _def("client_tls13_ciphers", "str", None, check=check_tls13_ciphers),
    _def("client_tls_ca_file", "str", ""),
    _def("client_tls_cert_file", "str", ""),
    _def("client_tls_ciphers", "str", "default"),
    _def("client_tls_dheparams", "str", "auto"),
    _def("client_tls_ecdhcurve", "str", "auto"),
    _def("client_tls_key_file", "str", ""),
    _def("client_tls_protocols", "str", "secure"),
    _def("client_tls_sslmode", "enum", "disable", choices=SSL_MODES),
    _def("conffile", "str", None),
    _def("default_pool_size", "int", "20"),
    _def("disable_pqexec", "bool", "0", reloadable=_NO),
    _def("dns_max_ttl", "float", "15"),
    _def("dns_nxdomain_ttl", "float", "15"),
    _def("dns_zone_check_period", "float", "0"),
    _def("idle_transaction_timeout", "float", "0"),
    _def("ignore_startup_parameters", "list", ""),
    _def("job_name", "str", "pgbouncer", reloadable=_NO, aliases=("service_name",)),
    _def("listen_addr", "list", "", reloadable=_NO),
    _def("listen_backlog", "int", "128", reloadable=_NO),
    # PgBouncer takes any int (and then binds port % 65536); a TCP port is 1..65535.
    _def("listen_port", "int", "6432", reloadable=_NO, minimum=1, maximum=65535),
    _def("log_connections", "bool", "1"),
    _def("log_disconnections", "bool", "1"),
    _def("log_pooler_errors", "bool", "1"),
    _def("log_stats", "bool", "1"),
    _def("logfile", "str", ""),
    _def("login_notify_message", "str", ""),
    _def("max_client_conn", "int", "100"),
    _def("max_db_client_connections", "int", "0"),
    _def("max_db_connections", "int", "0"),
    _def("max_packet_size", "int", "2147483647", minimum=0, maximum=2**32 - 1),  # CF_UINT
    _def("max_prepared_statements", "int", "200"),
    _def("max_user_client_connections", "int", "0"),
    _def("max_user_connections", "int", "0"),
    _def("min_pool_size", "int", "0"),
    _def("peer_id", "int", "0", minimum=0, maximum=16383),  # the cancel key has 14 bits for it
    _def("pidfile", "str", "", reloadable=_NO),
    _def("pkt_buf", "int", "4096", reloadable=_NO),
    _def("pool_idle_timeout", "float", "0"),
    _def("pool_mode", "enum", "session", choices=POOL_MODES),
    _def("query_timeout", "float", "0"),
    _def("query_wait_notify", "int", "5", minimum=0),  # whole seconds (CF_INT in PgBouncer)
    _def("query_wait_timeout", "float", "120"),
    _def("reserve_pool_size", "int", "0"),
    _def("reserve_pool_timeout", "float", "5"),
    _def("resolv_conf", "str", "", reloadable=_NO),
    _def("sbuf_loopcnt", "int", "5"),
    _def("scram_iterations", "int", "4096", minimum=1),  # PBKDF2 needs at least one round
    _def("server_check_delay", "float", "30"),
    _def("server_check_query", "str", "<empty>"),
    _def("server_connect_timeout", "float", "15"),
    _def("server_fast_close", "bool", "0"),
    _def("server_idle_timeout", "float", "600"),
    _def("server_lifetime", "float", "3600"),
    _def("server_login_retry", "float", "15"),
    _def("server_reset_query", "str", "DISCARD ALL"),
    _def("server_reset_query_always", "bool", "0"),
    _def("server_round_robin", "bool", "0"),
    _def("server_tls13_ciphers", "str", None, check=check_tls13_ciphers),
    _def("server_tls_ca_file", "str", ""),
    _def("server_tls_cert_file", "str", ""),
    _def("server_tls_ciphers", "str", "default"),
    _def("server_tls_key_file", "str", ""),
    _def("server_tls_protocols", "str", "secure"),
    _def("server_tls_sslmode", "enum", "prefer", choices=SSL_MODES),
    _def("so_reuseport", "bool", "0", reloadable=_NO),
    _def("stats_period", "int", "60"),
    _def("stats_users", "list", ""),
    _def("suspend_timeout", "float", "10"),
    _def("syslog", "bool", "0"),
    _def("syslog_facility", "str", "daemon"),
    _def("syslog_ident", "str", "pgbouncer"),
    _def("tcp_defer_accept", "int", "1"),  # PgBouncer's default on Linux
    _def("tcp_keepalive", "bool", "1"),
    _def("tcp_keepcnt", "int", "0"),
    _def("tcp_keepidle", "int", "0"),
    _def("tcp_keepintvl", "int", "0"),
    _def("tcp_socket_buffer", "int", "0"),
    _def("tcp_user_timeout", "int", "0"),
    _def("track_extra_parameters", "list", "IntervalStyle", reloadable=_NO),
    _def("transaction_timeout", "float", "0"),
    _def("unix_socket_dir", "str", "/tmp", reloadable=_NO),
    _def("unix_socket_group", "str", "", reloadable=_NO),
    _def("unix_socket_mode", "octal", "0777", reloadable=_NO),
    _def("user", "str", None, reloadable=_NO),
    _def("verbose", "int", None, null_default=0),  # NULL default in PgBouncer, value 0
    # --- pgmux extensions: not in PgBouncer; kept after its keys so SHOW CONFIG's order of the
    # --- PgBouncer keys is unchanged (pgbouncer_exporter and scripts match by name anyway).
    # at most 128: the worker index lives in 7 bits of the cancel key (pgmux/workers.py)
    _def("workers", "int", "1", reloadable=_NO, minimum=1, maximum=128, extension=True),
    _def("metrics_listen", "str", "", reloadable=_NO, extension=True, check=check_host_port),
    _def("pin_session_state", "enum", "auto", choices=PIN_SESSION_STATE, extension=True),
    _def("pin_timeout", "float", "0", extension=True),
    # per-query statistics (SHOW QUERIES, /metrics, the dashboard): on, and how many statements
    _def("query_stats", "bool", "1", extension=True),
    _def("query_stats_max", "int", "5000", minimum=1, maximum=1000000, extension=True),
    _def("query_stats_metrics", "int", "20", minimum=0, maximum=1000, extension=True),
)

#: Every [pgbouncer] setting by canonical name, in SHOW CONFIG order.
SETTINGS: dict[str, SettingDef] = {d.name: d for d in _TABLE}

_BY_NAME: dict[str, SettingDef] = dict(SETTINGS)
for _d in _TABLE:
    for _alias in _d.aliases:
        _BY_NAME[_alias] = _d


#: PgBouncer settings pgmux accepts (so that PgBouncer's files load) but does not act on; a
#: non-default value gets a warning at start (unsupported_warnings()). README lists them. None
#: at present (PgBouncer's internal tuning knobs have no counterpart and are not reported).
UNSUPPORTED_SETTINGS: tuple[str, ...] = ()


def unsupported_warnings(settings: Settings) -> list[str]:
    """One warning per UNSUPPORTED_SETTINGS entry whose value is not its default."""
    return [f"setting {name} is not supported by pgmux and is ignored"
            for name in UNSUPPORTED_SETTINGS if not settings.is_default(name)]


def lookup_setting(name: str) -> SettingDef | None:
    """Find a setting by its exact (case-sensitive, like PgBouncer) name or alias."""
    return _BY_NAME.get(name)


def _copy_value(value: object) -> object:
    return list(value) if isinstance(value, list) else value


class Settings:
    """Typed values of the [pgbouncer] section, readable as attributes (``s.listen_port``).

    Values are plain instance attributes, so reading one on a hot path costs a dict lookup.
    Writes go through set(), which validates; assigning an attribute directly is refused.
    """

    _display: dict[str, str | None]

    def __init__(self) -> None:
        d = self.__dict__
        d["_display"] = {}
        for defn in _TABLE:
            d[defn.name] = _copy_value(defn.default)
            self._display[defn.name] = defn.format(defn.default, defn.default_text)

    def __getattr__(self, name: str) -> Any:
        # Only reached for names that are not settings: give a helpful error.
        raise AttributeError(f"no such pgbouncer setting: {name!r}")

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("use Settings.set() so that the value is validated")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Settings):
            return NotImplemented
        return all(self.__dict__[n] == other.__dict__[n] for n in SETTINGS)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        changed = [f"{n}={self.__dict__[n]!r}" for n, d in SETTINGS.items() if self.__dict__[n] != d.default]
        return f"Settings({', '.join(changed)})"

    def get(self, name: str) -> object:
        """Typed value of a setting by name or alias; KeyError for an unknown name."""
        defn = _BY_NAME.get(name)
        if defn is None:
            raise KeyError(name)
        return self.__dict__[defn.name]

    def set(self, name: str, raw: str, *, source: str = "SET") -> None:
        """Parse, validate and store one value; raise ConfigError naming the key if it is bad.

        ``source="SET"`` is the admin console: settings that cannot be reloaded are refused there.
        (PgBouncer 1.18 answers such a SET with success and silently keeps the old value, which
        hides the mistake; refusing lets the console answer ``SET failed``.) Any other source, such
        as ``"file"``, may set every setting.
        """
        defn = _BY_NAME.get(name)
        if defn is None and source == "SET":
            defn = _BY_NAME.get(name.lower())
        if defn is None:
            raise ConfigError("unknown parameter", key=name)
        try:
            value = defn.parse(raw)
        except ConfigError as exc:
            raise exc.located(file=None, line=None, key=name) from None
        if source == "SET" and not defn.reloadable:
            raise ConfigError("cannot be changed while running (restart required)", key=name)
        self.__dict__[defn.name] = value
        self._display[defn.name] = defn.format(value, raw)

    def copy(self) -> Settings:
        """An independent copy (list values are copied too)."""
        new = Settings.__new__(Settings)
        d = new.__dict__
        for n in SETTINGS:
            d[n] = _copy_value(self.__dict__[n])
        d["_display"] = dict(self._display)
        return new

    def as_dict(self) -> dict[str, object]:
        """Every setting's typed value, in SHOW CONFIG order."""
        return {n: _copy_value(self.__dict__[n]) for n in SETTINGS}

    def is_default(self, name: str) -> bool:
        """True if the setting currently holds its default value."""
        defn = _BY_NAME[name]
        return bool(self.__dict__[defn.name] == defn.default)

    def show_rows(self, *, nulls: bool = False) -> list[tuple[str, str, str, str]]:
        """Rows of SHOW CONFIG: (key, value, default, changeable), in PgBouncer's order.

        PgBouncer sends SQL NULL where it has no value or no default (auth_user, verbose's
        default, ...). The rows here use '' for those, or None with ``nulls=True`` for a console
        that can send NULLs.
        """
        rows: list[tuple[Any, Any, Any, str]] = []
        for defn in _TABLE:
            value = self._display[defn.name]
            default = defn.default_text
            if not nulls:
                value = "" if value is None else value
                default = "" if default is None else default
            rows.append((defn.name, value, default, "yes" if defn.reloadable else "no"))
        return rows

    def changed_nonreloadable(self, other: Settings) -> list[str]:
        """Names whose values differ between the two but that only take effect on restart."""
        return [d.name for d in _TABLE if not d.reloadable and self.__dict__[d.name] != other.__dict__[d.name]]

    def adopt_nonreloadable(self, running: Settings) -> list[str]:
        """Keep the running values of non-reloadable settings, as PgBouncer's RELOAD does.

        Call on freshly loaded settings with the running ones; returns the names whose new values
        were ignored (worth a log line: they need a restart).
        """
        changed = self.changed_nonreloadable(running)
        for name in changed:
            self.__dict__[name] = _copy_value(running.__dict__[name])
            self._display[name] = running._display[name]
        return changed

    def reset_to_defaults(self) -> list[str]:
        """What PgBouncer does at every ``[pgbouncer]`` header (libusual fill_defaults()).

        Every setting with a non-NULL default goes back to it; settings whose default is NULL
        (auth_file, auth_user, conffile, verbose, ...) keep their value. Returns the names that
        changed.
        """
        changed: list[str] = []
        for defn in _TABLE:
            if defn.default_text is None:
                continue
            if self.__dict__[defn.name] != defn.default:
                changed.append(defn.name)
            self.__dict__[defn.name] = _copy_value(defn.default)
            self._display[defn.name] = defn.format(defn.default, defn.default_text)
        return changed
