"""The Django example project (examples/djangoapp) as subprocesses: its environment, ``manage.py``, gunicorn.

Shared by tests/django and bench/django_bench.py. Django itself is not imported here: everything runs in
child processes, so importing this module costs nothing when the django extras are missing.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pgmux.testing.cluster import TempCluster, free_port

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "djangoapp"


def example_env(cluster: TempCluster, pgmux_port: int, **extra: str) -> dict[str, str]:
    """This process's environment plus what the example's settings read: the cluster, the pooler's port."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(EXAMPLE), *filter(None, [env.get("PYTHONPATH")])])
    env.update({
        "DJANGO_SETTINGS_MODULE": "djangoapp.settings",
        "PG_HOST": cluster.host,
        "PG_PORT": str(cluster.port),
        "PGMUX_HOST": "127.0.0.1",
        "PGMUX_PORT": str(pgmux_port),
    })
    env.update(extra)
    return env


def manage(env: dict[str, str], *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """``manage.py ARGS`` of the example, output captured."""
    return subprocess.run([sys.executable, "manage.py", *args], cwd=EXAMPLE, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def stop_process(proc: subprocess.Popen[Any]) -> int:
    """SIGTERM, SIGKILL after 10 s; the exit code. Safe to call repeatedly."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def http_get(port: int, path: str, timeout: float = 10) -> tuple[int, bytes]:
    """(status, body) of ``GET http://127.0.0.1:PORT/PATH``; error statuses are returned, not raised."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Gunicorn:
    """gunicorn (sync workers) serving the example on a free port, its output in a temporary file."""

    def __init__(self, env: dict[str, str], workers: int = 2, start_timeout: float = 30) -> None:
        self.port = free_port()
        env = dict(env, GUNICORN_BIND=f"127.0.0.1:{self.port}", GUNICORN_WORKERS=str(workers))
        self.logfile = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as gunicorn
            prefix="pgmux-gunicorn-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"], cwd=EXAMPLE,
                                     env=env, stdout=self.logfile, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited:\n{self.log_text()[-3000:]}")
            with contextlib.suppress(OSError):
                if http_get(self.port, "/nodb/", timeout=5)[0] == 200:
                    return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gunicorn did not answer within {start_timeout:g} s")

    def log_text(self) -> str:
        return Path(self.logfile.name).read_text(errors="replace") if os.path.exists(self.logfile.name) else ""

    def stop(self) -> str:
        """Stop gunicorn, delete its log file; what it printed."""
        stop_process(self.proc)
        self.logfile.close()
        output = self.log_text()
        with contextlib.suppress(OSError):
            os.unlink(self.logfile.name)
        return output
