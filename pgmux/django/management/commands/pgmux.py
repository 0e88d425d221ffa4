"""``manage.py pgmux``: run pgmux for the pooled DATABASES entries, from settings alone.

The generated configuration listens at the entries' HOST:PORT, has one ``[databases]`` line per NAME
and a ``*`` line (so ``manage.py test`` can create ``test_<NAME>`` through it), and makes the
application users ``stats_users`` (health/metrics views). The pooler runs as ``python -m pgmux`` in a
child process; SIGINT/SIGTERM/SIGHUP/SIGQUIT are passed on to it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from pgmux.django.config import ConfigError, build_config

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def pgmux_env() -> dict[str, str]:
    """The child must import this very pgmux, even from a source checkout that is not installed."""
    import pgmux

    root = str(Path(pgmux.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGTERM the pooler if this command dies without forwarding a signal (e.g. SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class Command(BaseCommand):
    help = "Run the pgmux pooler for settings.DATABASES (entries made with pgmux.django.database())."
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--database", action="append", dest="aliases", metavar="ALIAS",
                            help="alias to serve (repeatable; default: every entry with a PGMUX key)")
        parser.add_argument("--workdir", help="directory for pgbouncer.ini/userlist.txt/socket (default: temporary)")
        parser.add_argument("--port", type=int, help="listen on this port instead of the entries' PORT")
        parser.add_argument("--no-wildcard", action="store_true", help="no '*' database (test databases need it)")
        parser.add_argument("--print-config", action="store_true", help="print pgbouncer.ini and exit")
        parser.add_argument("--debug", action="count", default=0, help="more pooler logging (pgmux -v); repeat")

    def handle(self, *args: Any, **opts: Any) -> None:
        workdir = opts["workdir"]
        temporary = workdir is None
        if temporary:
            workdir = tempfile.mkdtemp(prefix="pgmux-django-")
        workdir = os.path.abspath(workdir)
        try:
            try:
                config = build_config(settings.DATABASES, opts["aliases"], auth_file="userlist.txt",
                                      unix_socket_dir=workdir, wildcard=not opts["no_wildcard"],
                                      listen_port=opts["port"])
            except ConfigError as e:
                raise CommandError(str(e)) from e
            if opts["print_config"]:
                self.stdout.write(config.ini, ending="")
                return
            ini, _ = config.write(workdir)
            self.stdout.write(
                f"pgmux for DATABASES {', '.join(config.aliases)} on {config.listen_host}:{config.listen_port}"
                f" (config in {ini})")
            self.stdout.flush()
            code = self.run_pooler(workdir, ini, opts["debug"])
        finally:
            if temporary:
                shutil.rmtree(workdir, ignore_errors=True)
        if code:
            raise CommandError(f"pgmux exited with status {code}", returncode=code)

    def run_pooler(self, workdir: str, ini: Path, debug: int) -> int:
        cmd = [sys.executable, "-m", "pgmux", *(["-v"] * debug), str(ini)]
        proc = subprocess.Popen(cmd, cwd=workdir, env=pgmux_env(),
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)

        def forward(signum: int, _frame: Any) -> None:
            if proc.poll() is None:
                proc.send_signal(signum)

        previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
        try:
            while True:
                try:
                    return proc.wait()
                except KeyboardInterrupt:  # pragma: no cover - SIGINT handler replaced above
                    continue
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
