"""Cancel keys in PgBouncer's peering layout, and the sd_notify datagrams, without a pooler."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pgmux.net import peers, systemd


def test_cancel_key_carries_peer_id_little_endian_and_a_full_ttl() -> None:
    key = bytearray(8)
    peers.stamp_peer(key, 0x1234)
    assert (key[1], key[2], key[7] & 3) == (0x34, 0x12, 3)  # PgBouncer: key[1] = id & 0xFF, key[2] = id >> 8
    assert peers.key_peer(bytes(key)) == 0x1234
    spent = bytes(key[:7]) + bytes([key[7] & ~3])
    assert peers.key_ttl(spent) == 0 and peers.as_issued(spent) == bytes(key)


def test_notify_sends_one_datagram_per_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(path)
        receiver.settimeout(2)
        monkeypatch.setattr(systemd, "_notify_read", False)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert systemd.notify_stopping()
        assert "NOTIFY_SOCKET" not in os.environ  # read once, not passed on to children
        assert receiver.recv(100) == b"STOPPING=1"
        systemd.disable_notify()
        assert not systemd.notify_ready()


def test_listen_fds_meant_for_another_pid_are_ignored() -> None:
    code = ("import os, socket; from pgmux.net import systemd; s = socket.socket(); "
            "os.dup2(s.fileno(), 3); print(len(systemd.listen_fds()), 'LISTEN_FDS' in os.environ)")
    env = {**os.environ, "LISTEN_FDS": "1", "LISTEN_PID": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "False"]
