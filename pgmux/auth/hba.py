"""PgBouncer's ``auth_hba_file`` and ``auth_ident_file`` (``auth_type = hba``), parsed once and matched per login.

Sans-I/O apart from ``load()`` and reading ``@file`` includes (both replaceable). The grammar is PgBouncer's
(``src/hba.c``, 1.23+), which is a subset of PostgreSQL's ``pg_hba.conf``; where PgBouncer silently drops a line
it cannot parse, we raise :class:`HbaError` naming ``file:line`` instead, so a broken file never loads as a
quietly different rule set (the caller keeps the previous rules on RELOAD).

HBA records, one per line::

    local      DATABASE USER                 METHOD [map=NAME]
    host       DATABASE USER ADDRESS         METHOD [map=NAME]
    hostssl    DATABASE USER ADDRESS/BITS    METHOD [map=NAME]
    hostnossl  DATABASE USER ADDRESS MASK    METHOD [map=NAME]

* tokens as PgBouncer splits them: whitespace separates fields, ``#`` outside quotes starts a comment (also in
  the middle of a word), ``"..."`` quotes with ``""`` for one ``"``; commas build lists and may have whitespace
  around them. Keywords are case-sensitive; a quoted keyword (``"all"``) is a plain name.
* DATABASE: ``all``, ``sameuser`` (database name equals user name), ``replication`` (physical replication
  connections only; ``all`` does not match those), ``@file``, names; ``samerole``/``samegroup`` are refused.
* USER: ``all``, ``@file``, names. ``+group`` is refused: PgBouncer has no role membership to consult.
* ADDRESS: ``all``, ``a.b.c.d/n``, an IPv6 CIDR, or an address followed by a separate mask column. Host names,
  ``samehost`` and ``samenet`` are refused.
* METHOD: ``trust``, ``reject``, ``md5``, ``scram-sha-256``, ``password`` (PgBouncer's ``plain``), ``cert``,
  ``peer``, ``ldap`` (PgBouncer 1.25), ``pam`` (PgBouncer 1.24.0 only; see ``_REFUSED_METHODS``' history). The
  option ``map=NAME``, for ``cert`` and ``peer``, names a map in the ident file; an ``ldap`` line's options are
  the rest of the line, PostgreSQL's ldap options as in ``auth_ldap_options`` (checked when loaded).
* ``@file`` names a file of comma- or line-separated names (keywords allowed, ``#`` comments, nesting allowed),
  relative to the directory of the file that mentions it.
* No line continuation: PgBouncer reads one record per line, so a trailing ``\\`` is an error, not a join.

Ident map lines: ``MAPNAME SYSTEM-USER DB-USER``; ``DB-USER`` may be ``all``. There are no regular expressions
(PgBouncer compares literally), so an unquoted ``/regex`` is refused rather than never matching.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from pgmux.auth.external import LdapOptions, LdapOptionsError, missing_library, parse_ldap_options

__all__ = [
    "CONN_TYPES",
    "METHODS",
    "HbaError",
    "HbaRule",
    "HbaRules",
    "IdentMap",
    "IdentMapError",
    "IdentMapping",
    "NameList",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

CONN_TYPES = ("local", "host", "hostssl", "hostnossl")
METHODS = ("trust", "reject", "md5", "scram-sha-256", "password", "cert", "peer", "ldap", "pam")
_MAP_METHODS = ("cert", "peer")

# Methods people write in pg_hba.conf that PgBouncer (or pgmux) does not take, with the reason.
_REFUSED_METHODS = {
    "plain": "write 'password' for plain-text passwords in an HBA file",
    "any": "'any' is an auth_type, not an HBA method",
    "hba": "'hba' is an auth_type, not an HBA method",
}

# C isspace() in the "C" locale, as PgBouncer's tokenizer uses; str.isspace() would accept Unicode spaces too.
_C_SPACE = frozenset(" \t\n\v\f\r")
_IDENT_STOP = frozenset(',#"') | _C_SPACE
_BOM = "\ufeff"


class HbaError(Exception):
    """A problem at a place in an HBA (or ident) file; ``str()`` is ``<file>:<line>: <message>``."""

    def __init__(self, file: str, line: int | None, message: str) -> None:
        super().__init__(file, line, message)
        self.file = file
        self.line = line
        self.message = message

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.file}: {self.message}"
        return f"{self.file}:{self.line}: {self.message}"


class IdentMapError(HbaError):
    """A problem in an ``auth_ident_file``; a subclass so that one ``except HbaError`` covers both files."""


class _LineError(Exception):
    """Raised inside the line parsers; the caller adds file and line."""


# --------------------------------------------------------------------------------------------------------------
# Tokens


@dataclass(frozen=True)
class _Token:
    kind: str  # "ident" | "string" | "comma"
    text: str
    start: int = field(default=0, compare=False)  # offsets in the line, for an ldap line's raw options
    end: int = field(default=0, compare=False)


def _tokenize(line: str) -> list[_Token]:
    """Split one line as PgBouncer's ``next_token`` does: idents, quoted strings and commas up to a ``#``."""
    nul = line.find("\0")
    if nul >= 0:  # PgBouncer reads the line as a C string
        line = line[:nul]
    tokens: list[_Token] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in _C_SPACE:
            i += 1
        if i >= n or line[i] == "#":
            return tokens
        c = line[i]
        if c == ",":
            tokens.append(_Token("comma", ",", i, i + 1))
            i += 1
        elif c == '"':
            j = i + 1
            out: list[str] = []
            while True:
                if j >= n:
                    raise _LineError("unterminated quoted string")
                if line[j] == '"':
                    if j + 1 < n and line[j + 1] == '"':
                        out.append('"')
                        j += 2
                        continue
                    break
                out.append(line[j])
                j += 1
            tokens.append(_Token("string", "".join(out), i, j + 1))
            i = j + 1
        else:
            j = i + 1
            while j < n and line[j] not in _IDENT_STOP:
                j += 1
            tokens.append(_Token("ident", line[i:j], i, j))
            i = j


def _check_no_continuation(tokens: list[_Token]) -> None:
    if tokens and tokens[-1].kind == "ident" and tokens[-1].text.endswith("\\"):
        raise _LineError(
            "line continuation with a trailing backslash is not supported (PgBouncer reads one record per line)"
        )


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """Number lines from 1, splitting on ``\\n`` only (``\\r`` is whitespace to the tokenizer anyway)."""
    if text.startswith(_BOM):
        text = text[1:]
    yield from enumerate(text.split("\n"), start=1)


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return f.read()


def _describe(tok: _Token | None) -> str:
    if tok is None:
        return "end of line"
    if tok.kind == "comma":
        return "','"
    if tok.kind == "string":
        return f'quoted "{tok.text}"'
    return repr(tok.text)


# --------------------------------------------------------------------------------------------------------------
# Rules


@dataclass(frozen=True)
class NameList:
    """A database or user column: keywords as flags, everything else as exact (case-sensitive) names."""

    all: bool = False
    sameuser: bool = False  # database column only: the database is named like the user
    replication: bool = False  # database column only: physical replication connections
    names: frozenset[str] = frozenset()

    def matches(self, name: str, other: str | None = None) -> bool:
        """Does ``name`` match? ``other`` is the user name, for ``sameuser``. ``replication`` is not looked at."""
        if self.all:
            return True
        if self.sameuser and other is not None and name == other:
            return True
        return name in self.names


@dataclass(frozen=True)
class HbaRule:
    """One parsed HBA record. ``network is None`` means any address (``local`` records and ``all``)."""

    line: int
    conn_type: str  # 'local' | 'host' | 'hostssl' | 'hostnossl'
    databases: NameList
    users: NameList
    address: str | None  # as written ('10.0.0.0/8', '10.0.0.0', 'all'); None for local
    mask: str | None  # the separate mask column as written, else None
    network: IPNetwork | None
    method: str  # one of METHODS, as written ('password', not 'plain')
    options: dict[str, str] = field(default_factory=dict, hash=False)
    file: str = ""
    ldap: LdapOptions | None = field(default=None, hash=False)  # the ldap method's parsed options

    @property
    def auth_type(self) -> str:
        """The method in ``auth_type`` spelling: ``password`` becomes ``plain``."""
        return "plain" if self.method == "password" else self.method

    @property
    def map(self) -> str | None:
        """The ``map=`` option (cert and peer only), or None: then the system name must equal the user name."""
        return self.options.get("map")

    def matches_address(self, ip: IPAddress) -> bool:
        """Address part only (callers normally use :meth:`HbaRules.match`)."""
        if self.network is None:
            return True
        candidates: list[IPAddress] = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        return any(c.version == self.network.version and c in self.network for c in candidates)


class _NamesBuilder:
    def __init__(self) -> None:
        self.all = False
        self.sameuser = False
        self.replication = False
        self.names: set[str] = set()

    def freeze(self) -> NameList:
        return NameList(self.all, self.sameuser, self.replication, frozenset(self.names))


class _HbaParser:
    """Parses an HBA text; one instance per ``HbaRules.parse`` call (it tracks the @file include stack)."""

    def __init__(self, filename: str, read_include: Callable[[str], str]) -> None:
        self.filename = filename
        self.read_include = read_include
        self.warnings: list[HbaError] = []
        self._stack: list[str] = [os.path.normpath(filename)]

    # names ----------------------------------------------------------------------------------------------------

    def _names(self, toks: list[_Token], i: int, column: str, out: _NamesBuilder, here: tuple[str, int]) -> int:
        """Read one comma-separated name list starting at ``toks[i]``; return the index after it."""
        is_db = column == "database"
        while True:
            tok = toks[i] if i < len(toks) else None
            if tok is None or tok.kind == "comma":
                if i > 0 and toks[i - 1].kind == "comma":
                    raise _LineError(f"missing {column} name after ','")
                raise _LineError(f"missing {column} name, found {_describe(tok)}")
            if tok.kind == "string":
                out.names.add(tok.text)
            else:
                word = tok.text
                if word == "all":
                    out.all = True
                elif word in ("sameuser", "samerole", "samegroup", "replication") and not is_db:
                    raise _LineError(
                        f"'{word}' is only a keyword in the database column; quote it (\"{word}\") to mean a user "
                        "of that name"
                    )
                elif word == "sameuser":
                    out.sameuser = True
                elif word in ("samerole", "samegroup"):
                    raise _LineError(f"{word} is not supported (PgBouncer has no role membership)")
                elif word == "replication":
                    out.replication = True
                elif word.startswith("+"):
                    raise _LineError(
                        f"group membership ({word}) is not supported by PgBouncer; list the users, or quote the "
                        "name if it really starts with '+'"
                    )
                elif word.startswith("@"):
                    self._include(word[1:], column, out, here)
                else:
                    out.names.add(word)
            i += 1
            if i < len(toks) and toks[i].kind == "comma":
                i += 1
                continue
            return i

    def _include(self, name: str, column: str, out: _NamesBuilder, here: tuple[str, int]) -> None:
        parent, parent_line = here
        if not name:
            raise _LineError("'@' must be followed by a file name")
        path = name if os.path.isabs(name) else os.path.join(os.path.dirname(parent), name)
        key = os.path.normpath(path)
        if key in self._stack:
            raise _LineError(f"@{name}: include loop through {path}")
        try:
            text = self.read_include(path)
        except OSError as exc:
            raise _LineError(f"could not read @{name} ({path}): {exc.strerror or exc}") from exc
        self._stack.append(key)
        try:
            for lineno, line in _lines(text):
                try:
                    toks = _tokenize(line)
                    if not toks:
                        continue  # blank and comment lines (PgBouncer would fail the whole rule on these)
                    end = self._names(toks, 0, column, out, (path, lineno))
                    if end < len(toks):
                        raise _LineError(
                            f"names in an @file must be separated by commas or newlines, found {_describe(toks[end])}"
                        )
                except _LineError as exc:
                    raise HbaError(path, lineno, f"{exc} (included from {parent}:{parent_line})") from None
        finally:
            self._stack.pop()

    # address --------------------------------------------------------------------------------------------------

    @staticmethod
    def _parse_ip(text: str, what: str) -> IPAddress:
        if "%" in text:
            raise _LineError(f"invalid {what} {text!r}: IPv6 zone indexes are not supported")
        try:
            return ipaddress.ip_address(text)
        except ValueError:
            pass
        if text in ("samehost", "samenet"):
            raise _LineError(f"{text} is not supported by PgBouncer; write the network in CIDR form")
        if any(c.isalpha() for c in text) and ":" not in text:
            raise _LineError(f"host names are not supported by PgBouncer ({text!r}); use an IP address or CIDR")
        raise _LineError(f"invalid {what} {text!r}")

    def _address(self, toks: list[_Token], i: int, lineno: int) -> tuple[str, str | None, IPNetwork | None, int]:
        tok = toks[i] if i < len(toks) else None
        if tok is None or tok.kind == "comma":
            raise _LineError(f"missing address, found {_describe(tok)}")
        if tok.kind == "string":
            raise _LineError(f'quoted address "{tok.text}": host names are not supported by PgBouncer')
        text = tok.text
        if text == "all":
            return text, None, None, i + 1
        if text in METHODS:
            raise _LineError(f"missing address before the method {text!r}")
        if "/" in text:
            addr_text, bits_text = text.split("/", 1)
            ip = self._parse_ip(addr_text, "address")
            if not bits_text.isascii() or not bits_text.isdigit():
                raise _LineError(f"invalid CIDR mask length {bits_text!r} in {text!r}")
            bits = int(bits_text)
            if bits > ip.max_prefixlen:
                raise _LineError(f"CIDR mask length {bits} is too long for {addr_text} (max {ip.max_prefixlen})")
            mask_text = None
            i += 1
        else:
            ip = self._parse_ip(text, "address")
            mtok = toks[i + 1] if i + 1 < len(toks) else None
            if mtok is None or mtok.kind != "ident":
                raise _LineError(f"address {text} needs a mask: write {text}/BITS or add a netmask column")
            mask_text = mtok.text
            try:
                mask = ipaddress.ip_address(mask_text)
            except ValueError:
                mask = None
            if mask is None or mask.version != ip.version:
                raise _LineError(f"invalid netmask {mask_text!r} for address {text}")
            all_ones = (1 << ip.max_prefixlen) - 1
            host = ~int(mask) & all_ones
            if host & (host + 1):
                raise _LineError(f"netmask {mask_text} is not contiguous")
            bits = ip.max_prefixlen - host.bit_length()
            i += 2
        network = ipaddress.ip_network(f"{ip}/{bits}", strict=False)
        if network.network_address != ip:
            self.warnings.append(
                HbaError(
                    self.filename,
                    lineno,
                    f"address {ip} has bits set outside its mask; matching {network} as PostgreSQL does "
                    "(PgBouncer would never match this rule)",
                )
            )
        return text, mask_text, network, i

    # record ---------------------------------------------------------------------------------------------------

    def parse_line(self, toks: list[_Token], lineno: int, line: str = "") -> HbaRule:
        here = (self.filename, lineno)
        first = toks[0]
        if first.kind != "ident" or first.text not in CONN_TYPES:
            raise _LineError(f"unknown record type {_describe(first)} (expected local, host, hostssl or hostnossl)")
        conn_type = first.text
        dbs, users = _NamesBuilder(), _NamesBuilder()
        i = self._names(toks, 1, "database", dbs, here)
        i = self._names(toks, i, "user", users, here)
        address: str | None = None
        mask: str | None = None
        network: IPNetwork | None = None
        if conn_type != "local":
            address, mask, network, i = self._address(toks, i, lineno)

        tok = toks[i] if i < len(toks) else None
        if tok is None or tok.kind != "ident":
            raise _LineError(f"missing authentication method, found {_describe(tok)}")
        method = tok.text
        if method not in METHODS:
            reason = _REFUSED_METHODS.get(method, "")
            raise _LineError(f"unsupported authentication method {method!r}" + (f": {reason}" if reason else ""))
        i += 1
        if method in ("ldap", "pam"):
            missing = missing_library(method)
            if missing is not None:
                raise _LineError(missing)
        ldap: LdapOptions | None = None
        if method == "ldap":
            raw = line[toks[i].start:toks[-1].end] if i < len(toks) else ""
            try:
                ldap = parse_ldap_options(raw)
            except LdapOptionsError as exc:
                raise _LineError(str(exc)) from None
            i = len(toks)

        options: dict[str, str] = {}
        for opt in toks[i:]:
            if opt.kind != "ident" or "=" not in opt.text:
                raise _LineError(f"unexpected {_describe(opt)} after the method (only map=NAME is supported)")
            name, value = opt.text.split("=", 1)
            if name != "map":
                raise _LineError(f"unsupported option {name!r} (PgBouncer supports only map=NAME)")
            if method not in _MAP_METHODS:
                raise _LineError(f"map= is only valid for the cert and peer methods, not {method}")
            if not value:
                raise _LineError("map= needs a map name (unquoted)")
            if name in options:
                raise _LineError("map= given twice")
            options[name] = value

        if method == "peer" and conn_type != "local":
            self.warnings.append(
                HbaError(self.filename, lineno, "peer authentication only works on local (Unix socket) connections")
            )
        if method == "cert" and conn_type != "hostssl":
            self.warnings.append(
                HbaError(self.filename, lineno, "cert authentication needs TLS; it fails on non-TLS connections")
            )
        return HbaRule(
            line=lineno,
            conn_type=conn_type,
            databases=dbs.freeze(),
            users=users.freeze(),
            address=address,
            mask=mask,
            network=network,
            method=method,
            options=options,
            file=self.filename,
            ldap=ldap,
        )


def _client_ip(address: str) -> IPAddress:
    """Parse a peer address as the listener reports it: plain, ``[v6]`` or with a ``%zone``."""
    text = address.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    text = text.split("%", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"not an IP address: {address!r}") from None


class HbaRules:
    """The rules of one HBA file in order; :meth:`match` returns the first that applies, as PostgreSQL does."""

    def __init__(self, rules: Sequence[HbaRule], filename: str, warnings: Sequence[HbaError] = ()) -> None:
        self.rules: tuple[HbaRule, ...] = tuple(rules)
        self.filename = filename
        # Accepted but suspicious lines (unraised HbaError items, to be logged by the caller).
        self.warnings: list[HbaError] = list(warnings)

    def __iter__(self) -> Iterator[HbaRule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def __repr__(self) -> str:
        return f"<HbaRules {self.filename!r}: {len(self.rules)} rules>"

    @classmethod
    def parse(
        cls,
        text: str,
        filename: str,
        *,
        read_include: Callable[[str], str] | None = None,
        ident: IdentMap | None = None,
    ) -> HbaRules:
        """Parse HBA text. ``@file`` paths resolve against ``dirname(filename)`` and are read with ``read_include``
        (default: from disk). With ``ident``, ``map=`` names are checked as PgBouncer does (see validate_maps)."""
        parser = _HbaParser(filename, read_include or _read_text)
        rules: list[HbaRule] = []
        for lineno, line in _lines(text):
            try:
                toks = _tokenize(line)
                _check_no_continuation(toks)
                if toks:
                    rules.append(parser.parse_line(toks, lineno, line))
            except _LineError as exc:
                raise HbaError(filename, lineno, str(exc)) from None
        result = cls(rules, filename, parser.warnings)
        if ident is not None:
            result.validate_maps(ident)
        return result

    @classmethod
    def load(cls, path: str, *, ident: IdentMap | None = None) -> HbaRules:
        """Read and parse ``path``; an unreadable file is an HbaError too (PgBouncer would then reject everyone)."""
        try:
            text = _read_text(path)
        except OSError as exc:
            raise HbaError(path, None, f"could not read HBA file: {exc.strerror or exc}") from exc
        return cls.parse(text, path, ident=ident)

    def validate_maps(self, ident: IdentMap | None) -> None:
        """Refuse ``map=`` names missing from the ident file (``None``: no ``auth_ident_file`` configured).

        PgBouncer drops such lines at load time; we raise at the first one instead."""
        for rule in self.rules:
            name = rule.map
            if name is None:
                continue
            if ident is None:
                raise HbaError(rule.file, rule.line, f"map={name} needs auth_ident_file, which is not set")
            if name not in ident:
                raise HbaError(rule.file, rule.line, f"map={name} is not defined in {ident.filename}")

    def match(
        self,
        *,
        conn_type: str,
        tls: bool,
        database: str,
        user: str,
        address: str | None,
        replication: bool = False,
    ) -> HbaRule | None:
        """The first rule for this login, or None (the caller rejects: "login rejected"). A ``reject`` rule is
        returned too; the caller rejects on it.

        ``conn_type`` is ``'local'`` (Unix socket, ``address`` ignored) or ``'host'`` (TCP, ``address`` is the
        peer IP; IPv4-mapped IPv6 addresses also match IPv4 rules). ``replication`` means a physical replication
        connection (``replication=true``): only rules whose database column has ``replication`` match it.
        Logical replication (``replication=database``) matches by database name like any login."""
        if conn_type not in ("local", "host"):
            raise ValueError(f"conn_type must be 'local' or 'host', not {conn_type!r}")
        ip: IPAddress | None = None
        if conn_type == "host":
            if address is None:
                raise ValueError("a 'host' connection needs the peer address")
            ip = _client_ip(address)
        for rule in self.rules:
            if ip is None:
                if rule.conn_type != "local":
                    continue
            else:
                if rule.conn_type == "local":
                    continue
                if rule.conn_type == "hostssl" and not tls:
                    continue
                if rule.conn_type == "hostnossl" and tls:
                    continue
                if not rule.matches_address(ip):
                    continue
            if replication:
                if not rule.databases.replication:
                    continue
            elif not rule.databases.matches(database, user):
                continue
            if not rule.users.matches(user):
                continue
            return rule
        return None


# --------------------------------------------------------------------------------------------------------------
# Ident maps


@dataclass(frozen=True)
class IdentMapping:
    """One ident map line. ``db_user is None`` stands for ``all``."""

    line: int
    map_name: str
    system_user: str
    db_user: str | None


class IdentMap:
    """``auth_ident_file``: which system names (certificate CN, peer OS user) may log in as which users."""

    def __init__(self, mappings: Sequence[IdentMapping], filename: str) -> None:
        self.mappings: tuple[IdentMapping, ...] = tuple(mappings)
        self.filename = filename
        self._maps: dict[str, list[IdentMapping]] = {}
        for m in self.mappings:
            self._maps.setdefault(m.map_name, []).append(m)

    def __contains__(self, map_name: object) -> bool:
        return map_name in self._maps

    def __len__(self) -> int:
        return len(self.mappings)

    def __repr__(self) -> str:
        return f"<IdentMap {self.filename!r}: {len(self._maps)} maps, {len(self.mappings)} lines>"

    @property
    def map_names(self) -> frozenset[str]:
        return frozenset(self._maps)

    @classmethod
    def parse(cls, text: str, filename: str) -> IdentMap:
        """Parse ident map text; the first bad line raises IdentMapError (PgBouncer would skip it)."""
        mappings: list[IdentMapping] = []
        for lineno, line in _lines(text):
            try:
                toks = _tokenize(line)
                _check_no_continuation(toks)
                if toks:
                    mappings.append(_parse_ident_line(toks, lineno))
            except _LineError as exc:
                raise IdentMapError(filename, lineno, str(exc)) from None
        return cls(mappings, filename)

    @classmethod
    def load(cls, path: str) -> IdentMap:
        try:
            text = _read_text(path)
        except OSError as exc:
            raise IdentMapError(path, None, f"could not read ident file: {exc.strerror or exc}") from exc
        return cls.parse(text, path)

    def allows(self, map_name: str, system_user: str, db_user: str) -> bool:
        """May ``system_user`` log in as ``db_user`` through ``map_name``? Exact, case-sensitive comparison."""
        for m in self._maps.get(map_name, ()):
            if m.system_user == system_user and (m.db_user is None or m.db_user == db_user):
                return True
        return False


def _parse_ident_line(toks: list[_Token], lineno: int) -> IdentMapping:
    if any(t.kind == "comma" for t in toks):
        raise _LineError("lists are not supported in ident map lines")
    if len(toks) < 3:
        missing = ("system user name", "database user name")[len(toks) - 1]
        raise _LineError(f"missing {missing} (expected: MAPNAME SYSTEM-USER DB-USER)")
    if len(toks) > 3:
        raise _LineError(f"unexpected {_describe(toks[3])} after the database user name")
    map_tok, sys_tok, db_tok = toks
    if map_tok.kind != "ident":
        raise _LineError("the map name must not be quoted")
    if sys_tok.kind == "ident" and sys_tok.text.startswith("/"):
        raise _LineError(
            f"regular expressions are not supported (PgBouncer compares names literally): {sys_tok.text!r}; "
            "quote the name if it really starts with '/'"
        )
    db_user: str | None
    if db_tok.kind == "ident":
        if db_tok.text == "all":
            db_user = None
        elif db_tok.text[:1] in ("+", "@"):
            raise _LineError(
                f"{db_tok.text!r}: group membership and @file are not supported in ident maps; "
                "quote the name if it really starts with that character"
            )
        else:
            db_user = db_tok.text
    else:
        db_user = db_tok.text
    return IdentMapping(line=lineno, map_name=map_tok.text, system_user=sys_tok.text, db_user=db_user)
