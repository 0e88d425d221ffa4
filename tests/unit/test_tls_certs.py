"""pgmux.testing.tls: the generated CA, server and client certificates work with Python's ssl module.

Every test runs once per available backend (the cryptography package, the openssl CLI).
"""

from __future__ import annotations

import socket
import ssl
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from pgmux.testing.tls import CA, available_backends, make_ca, make_other_ca

BACKENDS = available_backends()
pytestmark = pytest.mark.skipif(not BACKENDS, reason="neither cryptography nor openssl is available")


@pytest.fixture(params=BACKENDS or ["none"])
def pki(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    ca = make_ca(tmp_path, backend=request.param)
    server = ca.issue_server(tmp_path)
    alice = ca.issue_client(tmp_path, "alice")
    other = make_other_ca(tmp_path, backend=request.param)
    return {
        "dir": tmp_path,
        "ca": ca,
        "server": server,
        "alice": alice,
        "other": other,
        "mallory": other.issue_client(tmp_path, "mallory"),
        "rogue_server": other.issue_server(tmp_path, stem="rogue-server"),
    }


def server_context(cert: tuple[Path, Path], client_ca: CA | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*cert)
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(client_ca.cert_path))
    return ctx


def client_context(ca: CA, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    """What libpq's sslmode=verify-full does: trust only ``ca`` and check the host name."""
    ctx = ssl.create_default_context(cafile=str(ca.cert_path))
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    if cert is not None:
        ctx.load_cert_chain(*cert)
    return ctx


def handshake(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    server_hostname: str,
    *,
    tcp: bool = False,
) -> tuple[BaseException | None, BaseException | None, dict[str, Any]]:
    """Run a real handshake (socketpair, or 127.0.0.1 TCP) with the server side in a thread.

    Returns (server error, client error, info): info has the server's view of the client certificate and the
    client's view of the server certificate, when the handshake got that far."""
    if tcp:
        listener = socket.create_server(("127.0.0.1", 0))
        client_sock = socket.create_connection(listener.getsockname(), timeout=10)
        server_sock, _ = listener.accept()
        listener.close()
    else:
        server_sock, client_sock = socket.socketpair()
    server_sock.settimeout(10)
    client_sock.settimeout(10)
    errors: dict[str, BaseException | None] = {"server": None, "client": None}
    info: dict[str, Any] = {}

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(server_sock, server_side=True) as tls:
                info["client_cert"] = tls.getpeercert()
                tls.sendall(b"hello")
                tls.recv(1)  # wait for the client's close
        except (OSError, ssl.SSLError) as exc:
            errors["server"] = exc
        finally:
            server_sock.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(client_sock, server_hostname=server_hostname) as tls:
            info["server_cert"] = tls.getpeercert()
            info["data"] = tls.recv(5)  # TLS 1.3: a rejected client certificate shows up on the first read
    except (OSError, ssl.SSLError) as exc:
        errors["client"] = exc
    finally:
        client_sock.close()
        thread.join(15)
    assert not thread.is_alive()
    return errors["server"], errors["client"], info


def test_files_and_permissions(pki: dict[str, Any]) -> None:
    ca: CA = pki["ca"]
    assert ca.cert_path == pki["dir"] / "ca.crt" and ca.key_path == pki["dir"] / "ca.key"
    assert pki["server"] == (pki["dir"] / "server.crt", pki["dir"] / "server.key")
    assert pki["alice"] == (pki["dir"] / "client-alice.crt", pki["dir"] / "client-alice.key")
    assert pki["other"].cert_path == pki["dir"] / "other-ca.crt"  # does not overwrite the first CA
    for key in (ca.key_path, pki["server"][1], pki["alice"][1], pki["other"].key_path):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert b"-----BEGIN PRIVATE KEY-----" in key.read_bytes()
    for cert in (ca.cert_path, pki["server"][0], pki["alice"][0]):
        assert cert.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")


def test_load_cert_chain_accepts_every_pair(pki: dict[str, Any]) -> None:
    for pair in (pki["server"], pki["alice"], pki["mallory"], (pki["ca"].cert_path, pki["ca"].key_path)):
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(*pair)
    with pytest.raises(ssl.SSLError):  # a certificate with somebody else's key
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(pki["server"][0], pki["alice"][1])


@pytest.mark.parametrize("hostname", ["localhost", "127.0.0.1"])
@pytest.mark.parametrize("tcp", [False, True], ids=["socketpair", "tcp"])
def test_verify_full_with_client_certificate(pki: dict[str, Any], hostname: str, tcp: bool) -> None:
    server_err, client_err, info = handshake(
        server_context(pki["server"], client_ca=pki["ca"]),
        client_context(pki["ca"], pki["alice"]),
        hostname,
        tcp=tcp,
    )
    assert (server_err, client_err) == (None, None)
    assert info["data"] == b"hello"
    assert dict(x[0] for x in info["client_cert"]["subject"])["commonName"] == "alice"
    assert ("DNS", "localhost") in info["server_cert"]["subjectAltName"]
    assert ("IP Address", "127.0.0.1") in info["server_cert"]["subjectAltName"]
    assert dict(x[0] for x in info["server_cert"]["issuer"])["commonName"] == "pgmux test CA"


def test_wrong_ca_for_the_server_fails_verification(pki: dict[str, Any]) -> None:
    server_err, client_err, _ = handshake(
        server_context(pki["server"], client_ca=None), client_context(pki["other"]), "localhost"
    )
    assert isinstance(client_err, ssl.SSLCertVerificationError)
    assert "certificate verify failed" in str(client_err)


def test_server_certificate_from_an_unrelated_ca_fails(pki: dict[str, Any]) -> None:
    server_err, client_err, _ = handshake(
        server_context(pki["rogue_server"], client_ca=None), client_context(pki["ca"]), "localhost"
    )
    assert isinstance(client_err, ssl.SSLCertVerificationError)


def test_hostname_not_in_the_certificate_fails(pki: dict[str, Any]) -> None:
    server_err, client_err, _ = handshake(
        server_context(pki["server"], client_ca=None), client_context(pki["ca"]), "db.example.com"
    )
    assert isinstance(client_err, ssl.SSLCertVerificationError)
    assert "Hostname mismatch" in str(client_err) or "doesn't match" in str(client_err)


def test_client_certificate_from_the_wrong_ca_is_refused(pki: dict[str, Any]) -> None:
    server_err, client_err, info = handshake(
        server_context(pki["server"], client_ca=pki["ca"]), client_context(pki["ca"], pki["mallory"]), "localhost"
    )
    assert isinstance(server_err, ssl.SSLError)
    assert "certificate verify failed" in str(server_err)
    assert client_err is not None
    assert "client_cert" not in info


def test_missing_client_certificate_is_refused_when_required(pki: dict[str, Any]) -> None:
    server_err, client_err, _ = handshake(
        server_context(pki["server"], client_ca=pki["ca"]), client_context(pki["ca"]), "localhost"
    )
    assert isinstance(server_err, ssl.SSLError)
    assert client_err is not None


def test_custom_server_names_and_odd_client_cn(pki: dict[str, Any]) -> None:
    ca: CA = pki["ca"]
    cert, key = ca.issue_server(pki["dir"], names=("pg.test", "::1", "10.0.0.7"), stem="custom")
    assert cert.name == "custom.crt"
    odd_cert, odd_key = ca.issue_client(pki["dir"], "user/with+odd=chars")
    assert odd_cert.parent == pki["dir"] and odd_cert.name == "client-user_with_odd_chars.crt"
    server_err, client_err, info = handshake(
        server_context((cert, key), client_ca=ca), client_context(ca, (odd_cert, odd_key)), "pg.test"
    )
    assert (server_err, client_err) == (None, None)
    assert dict(x[0] for x in info["client_cert"]["subject"])["commonName"] == "user/with+odd=chars"
    sans = info["server_cert"]["subjectAltName"]
    assert ("DNS", "pg.test") in sans and ("IP Address", "10.0.0.7") in sans
    assert any(kind == "IP Address" and value.rstrip() in ("::1", "0:0:0:0:0:0:0:1") for kind, value in sans)


def test_argument_checks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="backend"):
        make_ca(tmp_path, backend="gnutls")
    ca = make_ca(tmp_path)
    with pytest.raises(ValueError):
        ca.issue_server(tmp_path, names=())
    with pytest.raises(ValueError):
        ca.issue_client(tmp_path, "")
