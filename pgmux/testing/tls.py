"""Throwaway certificate authorities and certificates for TLS tests, generated in the test run.

Why generated rather than checked in: certificates expire and private keys in a repository get copied into real
deployments. Each test run makes its own CA, a server certificate for ``localhost``/``127.0.0.1`` and client
certificates whose CN is the user name (what ``auth_type = cert`` and PostgreSQL's ``cert`` method compare), plus
a second, unrelated CA for "wrong CA" tests.

Two backends, same files: the ``cryptography`` package when it is importable (fast, in-process), otherwise the
``openssl`` command line tool, so that neither is a hard dependency. Keys are ECDSA P-256 (generation is
instant; libpq, PostgreSQL, psycopg, asyncpg and Python's ssl all accept them), stored as unencrypted PKCS#8 PEM
with mode 0600. PostgreSQL refuses a server key that is group- or world-readable unless root owns it, so when
the server runs as another user (``runuser -u postgres``) the caller must ``chown`` the key it hands over.

Usage::

    ca = make_ca(tmp)
    server_cert, server_key = ca.issue_server(tmp)
    client_cert, client_key = ca.issue_client(tmp, "alice")
    wrong = make_other_ca(tmp)  # not trusted by anyone
"""

from __future__ import annotations

import datetime
import importlib.util
import ipaddress
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["CA", "CertError", "available_backends", "default_backend", "make_ca", "make_other_ca"]

DEFAULT_DAYS = 30
_BACKENDS = ("cryptography", "openssl")


class CertError(RuntimeError):
    """Certificate generation failed (the message carries openssl's stderr when the CLI was used)."""


def available_backends() -> tuple[str, ...]:
    """The backends usable here, preferred first."""
    found = []
    if importlib.util.find_spec("cryptography") is not None:
        found.append("cryptography")
    if shutil.which("openssl"):
        found.append("openssl")
    return tuple(found)


def default_backend() -> str:
    found = available_backends()
    if not found:
        raise CertError("neither the 'cryptography' package nor the 'openssl' command is available")
    return found[0]


def _resolve_backend(backend: str) -> str:
    if backend == "auto":
        return default_backend()
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be 'auto', 'cryptography' or 'openssl', not {backend!r}")
    if backend not in available_backends():
        raise CertError(f"certificate backend {backend!r} is not available here")
    return backend


def _safe_stem(text: str) -> str:
    """A file-name-safe version of a CN, so ``issue_client(dir, 'a/b')`` cannot write outside ``dir``."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", text).strip(".")
    return stem or "client"


def _split_names(names: Sequence[str]) -> tuple[list[str], list[str]]:
    dns: list[str] = []
    ips: list[str] = []
    for name in names:
        try:
            ips.append(str(ipaddress.ip_address(name)))
        except ValueError:
            dns.append(name)
    return dns, ips


@dataclass(frozen=True)
class CA:
    """A certificate authority on disk; ``issue_*`` sign new leaf certificates with it."""

    cert_path: Path
    key_path: Path
    name: str
    backend: str
    days: int = DEFAULT_DAYS

    def issue_server(
        self,
        dir: str | os.PathLike[str],
        names: Sequence[str] = ("localhost", "127.0.0.1"),
        *,
        stem: str = "server",
    ) -> tuple[Path, Path]:
        """A server certificate whose subjectAltName lists ``names`` (IPs as IP entries, the rest as DNS),
        so that ``sslmode=verify-full`` / ``check_hostname`` accept any of them. CN is the first name."""
        if not names:
            raise ValueError("a server certificate needs at least one name")
        return self._issue(Path(dir), stem, cn=names[0], sans=names, server=True)

    def issue_client(self, dir: str | os.PathLike[str], cn: str, *, stem: str | None = None) -> tuple[Path, Path]:
        """A client certificate with ``CN=cn`` (the user name for cert authentication), written as
        ``client-<cn>.crt``/``.key`` unless ``stem`` is given."""
        if not cn:
            raise ValueError("a client certificate needs a CN")
        return self._issue(Path(dir), stem or f"client-{_safe_stem(cn)}", cn=cn, sans=(), server=False)

    def _issue(self, dir: Path, stem: str, *, cn: str, sans: Sequence[str], server: bool) -> tuple[Path, Path]:
        dir.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = dir / f"{stem}.crt", dir / f"{stem}.key"
        if self.backend == "cryptography":
            _crypto_issue(self, cert_path, key_path, cn=cn, sans=sans, server=server)
        else:
            _openssl_issue(self, cert_path, key_path, cn=cn, sans=sans, server=server)
        return cert_path, key_path


def make_ca(
    dir: str | os.PathLike[str],
    *,
    name: str = "pgmux test CA",
    stem: str = "ca",
    days: int = DEFAULT_DAYS,
    backend: str = "auto",
) -> CA:
    """Create a self-signed CA as ``<dir>/<stem>.crt`` and ``<dir>/<stem>.key``."""
    backend = _resolve_backend(backend)
    path = Path(dir)
    path.mkdir(parents=True, exist_ok=True)
    ca = CA(cert_path=path / f"{stem}.crt", key_path=path / f"{stem}.key", name=name, backend=backend, days=days)
    if backend == "cryptography":
        _crypto_make_ca(ca)
    else:
        _openssl_make_ca(ca)
    return ca


def make_other_ca(dir: str | os.PathLike[str], *, backend: str = "auto", days: int = DEFAULT_DAYS) -> CA:
    """A second CA with its own key and name, for "signed by the wrong CA" tests; files ``other-ca.*``."""
    return make_ca(dir, name="pgmux unrelated CA", stem="other-ca", days=days, backend=backend)


def _write_key(path: Path, pem: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(path, 0o600)  # also when the file existed with other permissions


# --------------------------------------------------------------------------------------------------------------
# cryptography backend


def _crypto_validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.UTC)
    return now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days)  # an hour of clock skew


def _crypto_builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int, *, ca: bool
) -> x509.CertificateBuilder:
    """What CA and leaf certificates share: names, key, serial, validity, basicConstraints, and keyUsage
    (keyCertSign and cRLSign for a CA, keyAgreement for a leaf)."""
    from cryptography import x509

    not_before, not_after = _crypto_validity(days)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=not ca,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )


def _crypto_save(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, key_path: Path, cert_path: Path) -> None:
    """The key as unencrypted PKCS#8 PEM (mode 0600), the certificate as PEM."""
    from cryptography.hazmat.primitives import serialization

    _write_key(
        key_path,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _crypto_make_ca(ca: CA) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ca.name)])
    cert = (
        _crypto_builder(subject, subject, key.public_key(), ca.days, ca=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _crypto_save(key, cert, ca.key_path, ca.cert_path)


def _crypto_issue(ca: CA, cert_path: Path, key_path: Path, *, cn: str, sans: Sequence[str], server: bool) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key = serialization.load_pem_private_key(ca.key_path.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_path.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (
        _crypto_builder(subject, ca_cert.subject, key.public_key(), ca.days, ca=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    if sans:
        dns, ips = _split_names(sans)
        entries: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        entries += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(entries), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    _crypto_save(key, cert, key_path, cert_path)


# --------------------------------------------------------------------------------------------------------------
# openssl CLI backend


def _openssl(*args: str, cwd: Path | None = None) -> None:
    cmd = ["openssl", *args]
    # A clean environment: an OPENSSL_CONF pointing at a broken or FIPS-only file must not change the outcome.
    env = {k: v for k, v in os.environ.items() if k not in ("OPENSSL_CONF", "RANDFILE")}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise CertError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")


def _subject(cn: str) -> str:
    """``-subj`` syntax: ``/CN=value`` with ``/``, ``+``, ``=`` and ``\\`` escaped."""
    return "/CN=" + re.sub(r"([\\/+=])", r"\\\1", cn)


_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")  # -nodes: OpenSSL 1.1 and 3.x


def _openssl_make_ca(ca: CA) -> None:
    with tempfile.TemporaryDirectory(prefix="pgmux-ca-") as tmp:
        key_tmp = Path(tmp) / "ca.key"
        _openssl(
            "req", "-x509", *_EC_KEY, "-utf8", "-sha256",
            "-keyout", str(key_tmp), "-out", str(ca.cert_path),
            "-days", str(ca.days), "-subj", _subject(ca.name),
            "-set_serial", f"0x{secrets.token_hex(16)}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,digitalSignature,keyCertSign,cRLSign",
            "-addext", "subjectKeyIdentifier=hash",
        )  # fmt: skip
        _write_key(ca.key_path, key_tmp.read_bytes())


def _openssl_issue(ca: CA, cert_path: Path, key_path: Path, *, cn: str, sans: Sequence[str], server: bool) -> None:
    ext = [
        "[v3]",
        "basicConstraints = critical, CA:FALSE",
        "keyUsage = critical, digitalSignature, keyAgreement",
        f"extendedKeyUsage = {'serverAuth' if server else 'clientAuth'}",
        "subjectKeyIdentifier = hash",
        "authorityKeyIdentifier = keyid, issuer",
    ]
    if sans:
        dns, ips = _split_names(sans)
        for name in dns:
            if not re.fullmatch(r"[A-Za-z0-9*._-]+", name):
                raise ValueError(f"unsupported DNS name for the openssl backend: {name!r}")
        ext.append("subjectAltName = " + ", ".join([f"DNS:{d}" for d in dns] + [f"IP:{ip}" for ip in ips]))
    with tempfile.TemporaryDirectory(prefix="pgmux-cert-") as tmp:
        t = Path(tmp)
        (t / "ext.cnf").write_text("\n".join(ext) + "\n")
        _openssl(
            "req", "-new", *_EC_KEY, "-utf8", "-sha256",
            "-keyout", str(t / "leaf.key"), "-out", str(t / "leaf.csr"), "-subj", _subject(cn),
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", str(t / "leaf.csr"), "-sha256",
            "-CA", str(ca.cert_path), "-CAkey", str(ca.key_path),
            "-set_serial", f"0x{secrets.token_hex(16)}", "-days", str(ca.days),
            "-extfile", str(t / "ext.cnf"), "-extensions", "v3",
            "-out", str(cert_path),
        )  # fmt: skip
        _write_key(key_path, (t / "leaf.key").read_bytes())
