"""Helpers for the pgmux.django tests (imported by conftest.py and the test modules).

Importing it configures Django in-process (contenttypes + pgmux.django, USE_TZ) for the check and view
tests, which swap ``DATABASES`` with ``use_databases``; the example project runs in subprocesses.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("django")

import django  # noqa: E402
from django.conf import settings  # noqa: E402

from pgmux.testing import djangoapp  # noqa: E402
from pgmux.testing.cluster import TempCluster, free_port, port_accepts, tail  # noqa: E402
from pgmux.testing.djangoapp import EXAMPLE, stop_process  # noqa: E402

SHOP = {"name": "shop", "user": "shop", "password": "shop"}

if not settings.configured:
    settings.configure(
        INSTALLED_APPS=["django.contrib.contenttypes", "pgmux.django"],
        DATABASES={},
        USE_TZ=True,
        TIME_ZONE="UTC",
        SECRET_KEY="tests",
        ROOT_URLCONF="pgmux.django.urls",
        ALLOWED_HOSTS=["testserver"],
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
    )
    django.setup()


@contextlib.contextmanager
def use_databases(databases: dict[str, dict[str, Any]], *modules: Any, **more_settings: Any) -> Iterator[Any]:
    """override_settings(DATABASES=...) plus a fresh ConnectionHandler patched into ``modules``."""
    from django.db.utils import ConnectionHandler
    from django.test import override_settings

    handler = ConnectionHandler(databases)
    saved = [(m, m.connections) for m in modules]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Overriding setting DATABASES can lead to unexpected behavior"
        with override_settings(DATABASES=databases, **more_settings):
            for m in modules:
                m.connections = handler
            try:
                yield handler
            finally:
                for m, c in saved:
                    m.connections = c
                handler.close_all()


def example_env(cluster: TempCluster, pgmux_port: int, **extra: str) -> dict[str, str]:
    """The example's environment, unbuffered so that a failing child's output is complete."""
    return djangoapp.example_env(cluster, pgmux_port, **{"PYTHONUNBUFFERED": "1", **extra})


@dataclass
class ManagedPooler:
    """``manage.py pgmux`` running as a subprocess."""

    proc: subprocess.Popen[str]
    port: int
    env: dict[str, str]
    logfile: Path

    def log_text(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def stop(self) -> int:
        return stop_process(self.proc)


def start_managed_pooler(cluster: TempCluster, workdir: Path, *args: str, **env_extra: str) -> ManagedPooler:
    """``manage.py pgmux`` for the example (its port retried if taken meanwhile)."""
    for _attempt in range(3):
        port = free_port()
        env = example_env(cluster, port, **env_extra)
        logfile = workdir / f"pgmux-{port}.log"
        with open(logfile, "w") as log:
            proc = subprocess.Popen([sys.executable, "manage.py", "pgmux", *args], cwd=EXAMPLE, env=env,
                                    stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        mp = ManagedPooler(proc, port, env, logfile)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            if port_accepts("127.0.0.1", port):
                return mp
            time.sleep(0.05)
        mp.stop()
        if "already in use" not in mp.log_text():
            break
    raise RuntimeError(f"manage.py pgmux did not start:\n{tail(mp.log_text())}")
