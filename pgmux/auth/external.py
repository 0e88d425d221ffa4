"""``auth_type = ldap`` and ``auth_type = pam`` (and the ``ldap``/``pam`` HBA methods), as PgBouncer 1.25 does them.

Both take the client's cleartext password and ask someone else: an LDAP server (``ldap3``) or the PAM stack
(``python-pam``, service ``pgbouncer``). Both libraries block, so every check runs in a worker thread and the
event loop only awaits its result. The libraries are optional extras (``pgmux[ldap]``, ``pgmux[pam]``),
imported on first use; :func:`require` tells a config loader whether the one it needs is installed.

LDAP options are PostgreSQL's ``pg_hba.conf`` ldap options in PgBouncer's syntax (``src/ldapauth.c``):
``key=value`` pairs separated by spaces or commas, a value may be ``"quoted"`` (``""`` for one ``"``), no
space after ``=``. Simple bind: ``ldapprefix``/``ldapsuffix``; search+bind: ``ldapbasedn`` with
``ldapbinddn``/``ldapbindpasswd`` and ``ldapsearchattribute`` (default ``uid``) or ``ldapsearchfilter``
(``$username`` replaced); also ``ldapserver`` (space-separated hosts), ``ldapport``, ``ldapscheme``
(``ldap``/``ldaps``), ``ldaptls=1`` (StartTLS) and ``ldapurl``. PgBouncer checks them at every login and
only logs a warning; we check them when the configuration is loaded, so a mistake names its file and line.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

__all__ = [
    "LdapOptions",
    "LdapOptionsError",
    "ldap_authenticate",
    "pam_authenticate",
    "parse_ldap_options",
    "missing_library",
]

PAM_SERVICE = "pgbouncer"  # PgBouncer's PGBOUNCER_PAM_SERVICE
LDAP_NETWORK_TIMEOUT = 3  # PgBouncer sets LDAP_OPT_NETWORK_TIMEOUT to 3 s
LDAP_TOTAL_TIMEOUT = 10  # one login's LDAP exchange (binds and search), whatever the server does

# The package each method needs, and the extra that installs it.
_LIBRARIES = {"ldap": ("ldap3", "ldap"), "pam": ("pam", "pam")}


def missing_library(method: str) -> str | None:
    """None if ``method`` (ldap or pam) can run here; otherwise the reason, naming the extra to install."""
    module, extra = _LIBRARIES[method]
    if importlib.util.find_spec(module) is not None:
        return None
    package = "ldap3" if method == "ldap" else "python-pam"
    return f"auth method {method} needs the {package} package (pip install 'pgmux[{extra}]')"


class LdapOptionsError(ValueError):
    """An LDAP options string PgBouncer would refuse (its log warning's wording)."""


@dataclass(frozen=True)
class LdapOptions:
    servers: tuple[str, ...] = ()
    port: int = 0  # 0: 389, or 636 for ldaps
    scheme: str = "ldap"
    tls: bool = False
    prefix: str | None = None
    suffix: str | None = None
    basedn: str | None = None
    binddn: str | None = None
    bindpasswd: str | None = None
    searchattribute: str | None = None
    searchfilter: str | None = None
    scope: str = "SUBTREE"

    @property
    def effective_port(self) -> int:
        if self.port:
            return self.port
        return 636 if self.scheme == "ldaps" else 389

    @property
    def server_text(self) -> str:
        return " ".join(self.servers)


_C_SPACE = " \t\n\v\f\r"


def _split_pairs(text: str) -> list[tuple[str, str]]:
    """PgBouncer's get_key_value loop: ``key=value`` items separated by spaces and an optional comma."""
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(text)

    def quoted(j: int) -> tuple[str, int]:  # text[j] is the opening quote
        out: list[str] = []
        j += 1
        while j < n:
            if text[j] == '"':
                if j + 1 < n and text[j + 1] == '"':
                    out.append('"')
                    j += 2
                    continue
                return "".join(out), j + 1
            out.append(text[j])
            j += 1
        raise LdapOptionsError("unterminated quoted string in LDAP options")

    while True:
        while i < n and text[i] in _C_SPACE:
            i += 1
        if i < n and text[i] == ",":
            i += 1
            while i < n and text[i] in _C_SPACE:
                i += 1
        if i >= n:
            return pairs
        if text[i] == '"':
            key, i = quoted(i)
        else:
            j = text.find("=", i)
            key, i = (text[i:] if j < 0 else text[i:j]), (n if j < 0 else j)
        if i >= n or text[i] != "=":
            raise LdapOptionsError(f'LDAP option "{key.strip()}" has no value (expected key=value)')
        i += 1
        if i < n and text[i] in _C_SPACE:
            raise LdapOptionsError(f'no space is allowed after "{key}="')
        if i < n and text[i] == '"':
            value, i = quoted(i)
        else:
            j = i
            while j < n and text[j] not in _C_SPACE and text[j] != ",":
                j += 1
            value, i = text[i:j], j
        if not key or not value:
            raise LdapOptionsError(f'LDAP option "{key}" needs a value')
        pairs.append((key, value))


_SCOPES = {"base": "BASE", "one": "LEVEL", "sub": "SUBTREE", "": "SUBTREE"}


def _parse_ldapurl(url: str, fields: dict[str, object]) -> None:
    """``scheme://host[:port]/basedn?attribute?scope?filter`` (RFC 4516), as ldap_url_parse reads it."""
    parts = urlsplit(url)
    if parts.scheme not in ("ldap", "ldaps"):
        raise LdapOptionsError(f"unsupported LDAP URL scheme: {parts.scheme or url}")
    fields["scheme"] = parts.scheme
    if parts.hostname:
        fields["servers"] = (parts.hostname,)
    try:
        port = parts.port
    except ValueError:
        raise LdapOptionsError(f'could not parse LDAP URL "{url}": bad port') from None
    if port:
        fields["port"] = port
    if parts.path.strip("/"):
        fields["basedn"] = unquote(parts.path.lstrip("/"))
    query = parts.query.split("?")
    if query and query[0]:
        fields["searchattribute"] = unquote(query[0]).split(",")[0]
    if len(query) > 1:
        scope = _SCOPES.get(query[1].lower())
        if scope is None:
            raise LdapOptionsError(f'could not parse LDAP URL "{url}": bad scope {query[1]!r}')
        fields["scope"] = scope
    if len(query) > 2 and query[2]:
        fields["searchfilter"] = unquote(query[2])


_STRING_KEYS = {"ldapbinddn": "binddn", "ldapsearchattribute": "searchattribute", "ldapsearchfilter": "searchfilter",
                "ldapbasedn": "basedn", "ldapbindpasswd": "bindpasswd", "ldapprefix": "prefix",
                "ldapsuffix": "suffix"}


def parse_ldap_options(text: str) -> LdapOptions:
    """Parse and check an options string (auth_ldap_options, or the rest of an HBA ``ldap`` line)."""
    fields: dict[str, object] = {}
    for key, value in _split_pairs(text):
        if key == "ldaptls":
            fields["tls"] = value == "1"
        elif key == "ldapscheme":
            if value not in ("ldap", "ldaps"):
                raise LdapOptionsError(f'invalid ldapscheme value: "{value}"')
            fields["scheme"] = value
        elif key == "ldapport":
            port = int(value) if value.isascii() and value.isdigit() else 0
            if not 0 < port < 65536:
                raise LdapOptionsError(f'invalid LDAP port number: "{value}"')
            fields["port"] = port
        elif key == "ldapserver":
            fields["servers"] = tuple(value.split())
        elif key in _STRING_KEYS:
            fields[_STRING_KEYS[key]] = value
        elif key == "ldapurl":
            _parse_ldapurl(value, fields)
        else:
            raise LdapOptionsError(f'invalid LDAP key parameter: "{key}"')
    opts = LdapOptions(**fields)  # type: ignore[arg-type]
    if opts.prefix is not None or opts.suffix is not None:
        if any(v is not None for v in (opts.basedn, opts.binddn, opts.bindpasswd, opts.searchattribute,
                                       opts.searchfilter)):
            raise LdapOptionsError("cannot use ldapbasedn, ldapbinddn, ldapbindpasswd, ldapsearchattribute, "
                                   "ldapsearchfilter, or ldapurl together with ldapprefix")
    elif opts.basedn is None:
        raise LdapOptionsError('authentication method "ldap" requires argument "ldapbasedn", "ldapprefix", '
                               'or "ldapsuffix" to be set')
    if opts.searchattribute is not None and opts.searchfilter is not None:
        raise LdapOptionsError("cannot use ldapsearchattribute together with ldapsearchfilter")
    if not opts.servers:
        # PgBouncer would look up DNS SRV records of the base DN's domain (OpenLDAP's ldap_domain2hostlist).
        raise LdapOptionsError("LDAP server not specified (ldapserver or ldapurl); DNS SRV discovery is not "
                               "supported by pgmux")
    return opts


# ------------------------------------------------------------------------------------------------------------
# The checks (run in worker threads)

_BAD_USER_CHARS = frozenset("*()\\/")


class _Failed(Exception):
    """An LDAP or PAM refusal; the text is PgBouncer's log warning."""


def _ldap_check(opts: LdapOptions, user: str, password: str) -> None:
    """Raise _Failed with PgBouncer's warning unless ``user``/``password`` binds (src/ldapauth.c)."""
    ldap3 = importlib.import_module("ldap3")
    exceptions = importlib.import_module("ldap3.core.exceptions")
    if not password:
        raise _Failed(f'empty password for LDAP user "{user}"')
    server_text = opts.server_text

    def connect(dn: str, pw: str) -> object:
        # The hosts in order, as libldap tries a URI list (ldap3's ServerPool would sleep between rounds).
        for n, host in enumerate(opts.servers, 1):
            server = ldap3.Server(host, port=opts.effective_port, use_ssl=opts.scheme == "ldaps",
                                  connect_timeout=LDAP_NETWORK_TIMEOUT)
            conn = ldap3.Connection(server, user=dn or None, password=pw or None, receive_timeout=LDAP_TOTAL_TIMEOUT,
                                    raise_exceptions=False, auto_referrals=False)
            try:
                conn.open()
                break
            except exceptions.LDAPSocketOpenError:
                if n == len(opts.servers):
                    raise
        if opts.tls and not conn.start_tls():
            result = conn.result.get("description", "") if conn.result else ""
            raise _Failed(f"could not start LDAP TLS session: {result}, server: {server_text}, "
                          f"port: {opts.effective_port}")
        return conn

    try:
        if opts.basedn is not None:
            if _BAD_USER_CHARS.intersection(user):
                raise _Failed("invalid character in user name for LDAP authentication")
            conn = connect(opts.binddn or "", opts.bindpasswd or "")
            if not conn.bind():  # type: ignore[attr-defined]
                raise _Failed(f'could not perform initial LDAP bind for ldapbinddn "{opts.binddn or ""}" on server '
                              f'"{server_text}": {_describe(conn)}')
            if opts.searchfilter is not None:
                flt = opts.searchfilter.replace("$username", user)
                attrs: list[str] = ["1.1"]
            else:
                attr = opts.searchattribute or "uid"
                flt, attrs = f"({attr}={user})", [attr]
            ok = conn.search(opts.basedn, flt, search_scope=getattr(ldap3, opts.scope),  # type: ignore[attr-defined]
                             attributes=attrs)
            entries = list(conn.response or []) if ok or conn.result.get("result") == 0 else None  # type: ignore
            conn.unbind()  # type: ignore[attr-defined]
            if entries is None:
                raise _Failed(f'could not search LDAP for filter "{flt}" on server "{server_text}": '
                              f"{_describe(conn)}")
            entries = [e for e in entries if e.get("type") == "searchResEntry"]
            if len(entries) == 0:
                raise _Failed(f'LDAP user "{user}" does not exist; LDAP search for filter "{flt}" on server '
                              f'"{server_text}" returned no entries.')
            if len(entries) > 1:
                raise _Failed(f'LDAP user "{user}" is not unique; LDAP search for filter "{flt}" on server '
                              f'"{server_text}" returned {len(entries)} entries.')
            fulluser = str(entries[0]["dn"])
        else:
            fulluser = f"{opts.prefix or ''}{user}{opts.suffix or ''}"
        conn = connect(fulluser, password)
        ok = conn.bind()  # type: ignore[attr-defined]
        conn.unbind()  # type: ignore[attr-defined]
        if not ok:
            raise _Failed(f"LDAP login failed for user {fulluser} on server {server_text}: {_describe(conn)}")
    except exceptions.LDAPException as exc:
        raise _Failed(f"LDAP login failed for user {user} on server {server_text}: {_ldap_error_text(exc)}") from exc


def _describe(conn: object) -> str:
    result = getattr(conn, "result", None) or {}
    text = result.get("description") or "Can't contact LDAP server"
    message = result.get("message")
    return f"{text} ({message})" if message else str(text)


def _ldap_error_text(exc: Exception) -> str:
    name = type(exc).__name__
    if "Socket" in name or "ServerPool" in name or "Timeout" in name:
        return f"Can't contact LDAP server ({exc})"
    return str(exc)


def _pam_check(user: str, password: str, rhost: str | None) -> None:
    pam = importlib.import_module("pam")
    p = pam.PamAuthenticator()
    env = {"PAM_RHOST": rhost} if rhost else None  # python-pam has no pam_set_item for it; modules see the env
    if not p.authenticate(user, password, service=PAM_SERVICE, env=env, resetcreds=False):
        # python-pam reports the step (pam_authenticate or pam_acct_mgmt) only through its reason text.
        raise _Failed(f"pam_authenticate() failed: {p.reason}")


# PgBouncer runs each in one worker thread fed by a queue. PAM modules need not be thread-safe, so PAM keeps
# one thread; LDAP gets a few so that one unreachable server does not hold every other login for seconds.
_executors: dict[str, ThreadPoolExecutor] = {}
_executors_lock = threading.Lock()


def _executor(kind: str) -> ThreadPoolExecutor:
    with _executors_lock:
        ex = _executors.get(kind)
        if ex is None:
            ex = _executors[kind] = ThreadPoolExecutor(max_workers=1 if kind == "pam" else 4,
                                                      thread_name_prefix=f"pgmux-{kind}")
        return ex


async def _run(kind: str, timeout: float | None, fn: Callable[..., None], *args: object) -> str | None:
    """Run a check in its worker thread; None if it passed, else the warning to log."""
    loop = asyncio.get_running_loop()
    fut = loop.run_in_executor(_executor(kind), fn, *args)
    try:
        await asyncio.wait_for(fut, timeout)
    except _Failed as exc:
        return str(exc)
    except TimeoutError:
        return f"{kind.upper()} authentication timed out after {timeout:g} s"
    except Exception as exc:  # a library failure must refuse this login, never crash the pooler
        return f"{kind.upper()} authentication error: {type(exc).__name__}: {exc}"
    return None


async def ldap_authenticate(opts: LdapOptions, user: str, password: str) -> str | None:
    """None if the LDAP server accepts ``user``/``password``; else the warning to log."""
    return await _run("ldap", LDAP_TOTAL_TIMEOUT + LDAP_NETWORK_TIMEOUT, _ldap_check, opts, user, password)


async def pam_authenticate(user: str, password: str, rhost: str | None) -> str | None:
    """None if PAM service ``pgbouncer`` accepts ``user``/``password``; else the warning to log."""
    return await _run("pam", None, _pam_check, user, password, rhost)
