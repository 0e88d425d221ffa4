"""Port ranges, the warning list of accepted-but-unimplemented settings, and apply_tcp_options."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from pgmux.config import ConfigError, Settings, load_config
from pgmux.config import settings as settings_module
from pgmux.config.settings import UNSUPPORTED_SETTINGS, unsupported_warnings
from pgmux.net.sockopts import apply_tcp_options


def _error(tmp_path: Path, body: str) -> ConfigError:
    path = tmp_path / "p.ini"
    path.write_text("[pgbouncer]\n" + body)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    return info.value


# --- ports -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["99999", "65536", "0", "-1", "0x10000"])
def test_listen_port_out_of_range(tmp_path: Path, value: str) -> None:
    err = _error(tmp_path, f"auth_type = trust\nlisten_port = {value}\n")
    assert str(err).startswith(f"{tmp_path / 'p.ini'}:3: listen_port: "), str(err)
    assert "1..65535" in str(err)


@pytest.mark.parametrize("value", ["1", "6432", "65535", "0xffff"])
def test_listen_port_in_range(tmp_path: Path, value: str) -> None:
    path = tmp_path / "p.ini"
    path.write_text(f"[pgbouncer]\nlisten_port = {value}\n")
    assert 1 <= load_config(str(path)).settings.listen_port <= 65535


@pytest.mark.parametrize("value", ["127.0.0.1:99999", "127.0.0.1:0", "127.0.0.1", "*:x", ":70000"])
def test_metrics_listen_port_checked_at_load(tmp_path: Path, value: str) -> None:
    err = _error(tmp_path, f"metrics_listen = {value}\n")
    assert str(err).startswith(f"{tmp_path / 'p.ini'}:2: metrics_listen: "), str(err)


@pytest.mark.parametrize("value", ["", "127.0.0.1:9127", "*:9127", ":9127", "[::1]:9127", "localhost:65535"])
def test_metrics_listen_valid(value: str) -> None:
    s = Settings()
    s.set("metrics_listen", value, source="file")
    assert s.metrics_listen == value
    assert dict((r[0], r[1]) for r in s.show_rows())["metrics_listen"] == value


# --- settings pgmux accepts but does not implement ------------------------------------------------


def test_unsupported_defaults_do_not_warn() -> None:
    assert unsupported_warnings(Settings()) == []


def test_unsupported_non_default_warns_once_each(monkeypatch: pytest.MonkeyPatch) -> None:
    # none is unsupported today: pretend login_notify_message still were
    monkeypatch.setattr(settings_module, "UNSUPPORTED_SETTINGS", ("login_notify_message",))
    s = Settings()
    for name, raw in (("login_notify_message", "hi"), ("server_fast_close", "1"), ("syslog", "1")):
        s.set(name, raw, source="file")  # the last two are supported: no warning
    assert unsupported_warnings(s) == ["setting login_notify_message is not supported by pgmux and is ignored"]


def test_login_notify_message_is_supported() -> None:
    s = Settings()
    s.set("login_notify_message", "hi", source="file")
    assert unsupported_warnings(s) == []


def test_unsupported_list_names_real_settings() -> None:
    for name in UNSUPPORTED_SETTINGS:
        Settings().get(name)  # KeyError for a typo


# --- apply_tcp_options -----------------------------------------------------------------------------


def _settings(**values: object) -> Settings:
    s = Settings()
    for name, value in values.items():
        s.set(name, str(value), source="file")
    return s


def _tcp_pair() -> tuple[socket.socket, socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    return listener, client, accepted


def test_apply_tcp_options_sets_everything() -> None:
    listener, client, sock = _tcp_pair()
    try:
        apply_tcp_options(sock, _settings(tcp_keepidle=31, tcp_keepintvl=7, tcp_keepcnt=3,
                                          tcp_user_timeout=2500, tcp_socket_buffer=32768))
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 31
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 7
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 2500
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * 32768  # Linux doubles it
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * 32768
    finally:
        for s in (listener, client, sock):
            s.close()


def test_apply_tcp_options_defaults_and_off() -> None:
    listener, client, sock = _tcp_pair()
    try:
        idle_before = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
        apply_tcp_options(sock, Settings())  # defaults: keepalive on, the kernel's timings
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == idle_before
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 0
        apply_tcp_options(sock, _settings(tcp_keepalive=0, tcp_keepidle=99))
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == idle_before
    finally:
        for s in (listener, client, sock):
            s.close()


def test_apply_tcp_options_leaves_unix_sockets_and_ignores_errors() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        apply_tcp_options(a, _settings(tcp_keepidle=31, tcp_socket_buffer=32768))
        assert a.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
    finally:
        a.close()
        b.close()
    apply_tcp_options(None, Settings())
    listener, client, sock = _tcp_pair()
    sock.close()
    try:
        apply_tcp_options(sock, _settings(tcp_keepidle=31))  # closed: setsockopt fails, no raise
    finally:
        listener.close()
        client.close()
