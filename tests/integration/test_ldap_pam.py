"""auth_type = ldap (auth_ldap_options), the ldap HBA method, and auth_type = pam, against a real slapd the
test starts (own config and data in a temp dir, own port) and the real PAM stack (service ``pgbouncer``,
pam_unix with a throwaway system user). Clients are psql (PGPASSWORD) and psycopg; both answer the pooler's
AuthenticationCleartextPassword. Debian's PgBouncer 1.18 has neither LDAP nor (in our oracle, which runs as
postgres and so cannot read /etc/shadow) a usable PAM, so these run against pgmux only."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgmux.testing.cluster import TempCluster, free_port

pytestmark = [pytest.mark.integration, pytest.mark.pgmux_only]

SLAPD = shutil.which("slapd") or "/usr/sbin/slapd"
SUFFIX = "dc=example,dc=net"
ADMIN_DN = f"cn=admin,{SUFFIX}"
ADMIN_PW = "adminpw"
PEOPLE = f"ou=people,{SUFFIX}"

# md5user exists in PostgreSQL with md5pass: an LDAP/PAM login with that password also lets the pooler log
# in to the server with it (the proven password is the user's, as PgBouncer does).
LDIF = f"""dn: {SUFFIX}
objectClass: dcObject
objectClass: organization
dc: example
o: example

dn: {PEOPLE}
objectClass: organizationalUnit
ou: people

dn: uid=md5user,{PEOPLE}
objectClass: inetOrgPerson
uid: md5user
cn: md5user
sn: user
mail: md5user@example.net
userPassword: md5pass

dn: uid=ldaponly,{PEOPLE}
objectClass: inetOrgPerson
uid: ldaponly
cn: ldaponly
sn: only
userPassword: ldappw
"""


def _wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"slapd did not listen on {port}")


@pytest.fixture(scope="module")
def slapd() -> Iterator[int]:
    """A slapd of the test's own: slapd.conf, an mdb database loaded with slapadd, 127.0.0.1 on a free port."""
    if not os.access(SLAPD, os.X_OK):
        pytest.skip("slapd is not installed (scripts/setup.sh installs slapd and ldap-utils)")
    d = Path(tempfile.mkdtemp(prefix="pgmux-slapd-"))
    (d / "data").mkdir()
    conf = d / "slapd.conf"
    conf.write_text(
        "include /etc/ldap/schema/core.schema\ninclude /etc/ldap/schema/cosine.schema\n"
        "include /etc/ldap/schema/inetorgperson.schema\nmodulepath /usr/lib/ldap\nmoduleload back_mdb\n"
        f"pidfile {d}/slapd.pid\ndatabase mdb\nmaxsize 10485760\ndirectory {d}/data\nsuffix \"{SUFFIX}\"\n"
        f"rootdn \"{ADMIN_DN}\"\nrootpw {ADMIN_PW}\n"
    )
    (d / "users.ldif").write_text(LDIF)
    subprocess.run(["slapadd", "-f", str(conf), "-l", str(d / "users.ldif")], check=True, capture_output=True)
    port = free_port()
    proc = subprocess.Popen([SLAPD, "-d", "0", "-h", f"ldap://127.0.0.1:{port}/", "-f", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(d, ignore_errors=True)


def _psql(dsn: str, password: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["psql", dsn, "-Atc", "SELECT current_user"], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PGPASSWORD": password})


def _login_ok(p: Any, user: str, password: str) -> None:
    out = _psql(p.dsn(user), password)
    assert out.returncode == 0 and out.stdout.strip() == user, out.stderr
    with psycopg.connect(p.dsn(user, password)) as c:
        assert c.execute("SELECT current_user").fetchone() == (user,)


def _login_refused(p: Any, user: str, password: str, text: str) -> None:
    out = _psql(p.dsn(user), password)
    assert out.returncode != 0 and text in out.stderr, out.stderr
    with pytest.raises(psycopg.OperationalError, match=text):
        psycopg.connect(p.dsn(user, password))


def test_ldap_simple_bind(slapd: int, pooler: Any) -> None:
    p = pooler(extra={"auth_type": "ldap", "auth_ldap_options":
                      f'ldapserver=127.0.0.1 ldapport={slapd} ldapprefix="uid=" ldapsuffix=",{PEOPLE}"'})
    _login_ok(p, "md5user", "md5pass")
    _login_refused(p, "md5user", "wrong", "LDAP authentication failed")
    _login_refused(p, "nosuchuser", "md5pass", "LDAP authentication failed")
    assert "LDAP login failed for user uid=md5user" in p.log_text()


def test_ldap_user_absent_from_auth_file_logs_in_to_server_with_its_password(slapd: int, pooler: Any) -> None:
    """Nothing in auth_file: the server login (md5 in PostgreSQL) answers with the password LDAP accepted."""
    p = pooler(userlist={"postgres": ""}, extra={"auth_type": "ldap", "auth_ldap_options":
               f'ldapserver=127.0.0.1 ldapport={slapd} ldapprefix="uid=" ldapsuffix=",{PEOPLE}"'})
    _login_ok(p, "md5user", "md5pass")


def test_ldap_search_bind_with_ldapurl_and_binddn(slapd: int, pooler: Any) -> None:
    p = pooler(extra={"auth_type": "ldap", "auth_ldap_options":
                      f'ldapurl="ldap://127.0.0.1:{slapd}/{SUFFIX}?uid?sub" ldapbinddn="{ADMIN_DN}" '
                      f"ldapbindpasswd={ADMIN_PW}"})
    _login_ok(p, "md5user", "md5pass")
    _login_refused(p, "md5user", "wrong", "LDAP authentication failed")
    _login_refused(p, "nosuchuser", "x", "LDAP authentication failed")
    assert 'LDAP user "nosuchuser" does not exist' in p.log_text()


def test_ldap_search_filter_anonymous(slapd: int, pooler: Any) -> None:
    p = pooler(extra={"auth_type": "ldap", "auth_ldap_options":
                      f'ldapserver=127.0.0.1 ldapport={slapd} ldapbasedn="{PEOPLE}" '
                      'ldapsearchfilter="(|(uid=$username)(mail=$username))"'})
    _login_ok(p, "md5user", "md5pass")
    _login_refused(p, "md5user", "wrong", "LDAP authentication failed")


def test_ldap_server_down_refuses_quickly(pooler: Any) -> None:
    dead = free_port()  # nothing listens there
    p = pooler(extra={"auth_type": "ldap", "auth_ldap_options":
                      f'ldapserver=127.0.0.1 ldapport={dead} ldapprefix="uid=" ldapsuffix=",{PEOPLE}"'})
    start = time.monotonic()
    _login_refused(p, "md5user", "md5pass", "LDAP authentication failed")
    assert time.monotonic() - start < 10
    assert "Can't contact LDAP server" in p.log_text()


def test_silent_ldap_server_does_not_stall_other_logins(pooler: Any) -> None:
    """An LDAP server that accepts the connection and never answers: the LDAP login waits in its worker
    thread while a SCRAM login through the same pooler completes at once."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # never accepted: the kernel completes the handshake, nobody answers the bind
    port = silent.getsockname()[1]
    p = pooler(extra={"auth_type": "hba", "auth_hba_file": "hba.conf"}, start=False)
    Path(p.workdir, "hba.conf").write_text(
        f'host testdb md5user 127.0.0.1/32 ldap ldapserver=127.0.0.1 ldapport={port} ldapprefix="uid=" '
        f'ldapsuffix=",{PEOPLE}"\nhost all all 127.0.0.1/32 scram-sha-256\n')
    p.start()
    stalled = subprocess.Popen(["psql", p.dsn("md5user"), "-Atc", "SELECT 1"], env={**os.environ,
                               "PGPASSWORD": "md5pass"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)  # the LDAP bind is now waiting
        assert stalled.poll() is None
        start = time.monotonic()
        with psycopg.connect(p.dsn("scramuser", "scrampass")) as c:
            assert c.execute("SELECT 1").fetchone() == (1,)
        assert time.monotonic() - start < 2
        _, err = stalled.communicate(timeout=30)
        assert stalled.returncode != 0 and "LDAP authentication failed" in err, err
    finally:
        stalled.kill()
        silent.close()


HBA_LDAP = """\
host testdb md5user 127.0.0.1/32 ldap ldapserver=127.0.0.1 ldapport={port} ldapprefix="uid=" ldapsuffix=",{people}"
host all all 127.0.0.1/32 md5
"""


def test_hba_ldap_line_with_options(slapd: int, pooler: Any) -> None:
    p = pooler(extra={"auth_type": "hba", "auth_hba_file": "hba.conf"}, start=False)
    Path(p.workdir, "hba.conf").write_text(HBA_LDAP.format(port=slapd, people=PEOPLE))
    p.start()
    _login_ok(p, "md5user", "md5pass")
    _login_refused(p, "md5user", "wrong", "LDAP authentication failed")


def test_hba_ldap_line_with_bad_options_is_refused_at_load(pooler: Any) -> None:
    p = pooler(extra={"auth_type": "hba", "auth_hba_file": "hba.conf"}, start=False)
    Path(p.workdir, "hba.conf").write_text("host all all 127.0.0.1/32 ldap ldapserver=127.0.0.1 ldapfoo=1\n")
    with pytest.raises(RuntimeError):
        p.start(timeout=5)
    assert 'hba.conf:1: invalid LDAP key parameter: "ldapfoo"' in p.log_text()


# ---------------------------------------------------------------------------------------------------- PAM

PAM_USER = "pgmuxpam"
PAM_PASSWORD = "pam-Secret-1"
PAM_FILE = Path("/etc/pam.d/pgbouncer")


@pytest.fixture(scope="module")
def pam_user() -> Iterator[str]:
    """A throwaway system user and /etc/pam.d/pgbouncer with pam_unix: needs root (pam_unix reads
    /etc/shadow directly only as root; unix_chkpwd checks nobody else's password)."""
    if os.geteuid() != 0:
        pytest.skip("the PAM test needs root: it adds a system user and /etc/pam.d/pgbouncer")
    if PAM_FILE.exists() and "pgmux test" not in PAM_FILE.read_text():
        pytest.skip(f"{PAM_FILE} exists and is not ours")
    PAM_FILE.write_text("# pgmux test: pam_unix against /etc/shadow\nauth required pam_unix.so\n"
                        "account required pam_unix.so\n")
    try:
        pwd.getpwnam(PAM_USER)
    except KeyError:
        subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", PAM_USER], check=True)
    subprocess.run(["chpasswd"], input=f"{PAM_USER}:{PAM_PASSWORD}\n", text=True, check=True)
    try:
        yield PAM_USER
    finally:
        subprocess.run(["userdel", PAM_USER], check=False)
        PAM_FILE.unlink(missing_ok=True)


def _pam_databases(cluster: TempCluster) -> dict[str, str]:
    # The PAM user is no PostgreSQL role: the database logs in as md5user.
    return {"testdb": "host={host} port={port} dbname=testdb user=md5user password=md5pass"}


def test_pam_login_and_wrong_password(pam_user: str, pooler: Any, cluster: TempCluster) -> None:
    p = pooler(extra={"auth_type": "pam"}, databases=_pam_databases(cluster))
    out = _psql(p.dsn(pam_user), PAM_PASSWORD)
    assert out.returncode == 0 and out.stdout.strip() == "md5user", out.stderr
    with psycopg.connect(p.dsn(pam_user, PAM_PASSWORD)) as c:
        assert c.execute("SELECT 1").fetchone() == (1,)
    _login_refused(p, pam_user, "wrong", "PAM authentication failed")
    _login_refused(p, "nosuchpamuser", PAM_PASSWORD, "PAM authentication failed")
    assert "pam_authenticate() failed" in p.log_text()


def test_hba_pam_line(pam_user: str, pooler: Any, cluster: TempCluster) -> None:
    p = pooler(extra={"auth_type": "hba", "auth_hba_file": "hba.conf"}, databases=_pam_databases(cluster),
               start=False)
    Path(p.workdir, "hba.conf").write_text(f"host testdb {pam_user} 127.0.0.1/32 pam\n")
    p.start()
    with psycopg.connect(p.dsn(pam_user, PAM_PASSWORD)) as c:
        assert c.execute("SELECT current_user").fetchone() == ("md5user",)
    _login_refused(p, pam_user, "wrong", "PAM authentication failed")
