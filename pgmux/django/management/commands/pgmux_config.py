"""``manage.py pgmux_config``: write pgbouncer.ini + userlist.txt for a separately deployed pooler."""

from __future__ import annotations

import os
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from pgmux.django.config import ConfigError, build_config


class Command(BaseCommand):
    help = ("Write a pgbouncer.ini and userlist.txt equivalent to what 'manage.py pgmux' runs, for a pooler "
            "deployed separately (userlist.txt holds the passwords: mode 0600).")
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--database", action="append", dest="aliases", metavar="ALIAS",
                            help="alias to include (repeatable; default: every entry with a PGMUX key)")
        parser.add_argument("--output", "-o", help="directory to write into (default: print both to stdout)")
        parser.add_argument("--auth-file", help="auth_file path written into the ini (default: absolute path "
                                                "of OUTPUT/userlist.txt, or userlist.txt)")
        parser.add_argument("--flavor", choices=("pgmux", "pgbouncer"), default="pgmux",
                            help="pgbouncer: leave out pgmux-only keys (pinning, prepared statements)")
        parser.add_argument("--no-wildcard", action="store_true", help="no '*' database entry")
        parser.add_argument("--unix-socket-dir", help="unix_socket_dir to write (default: the pooler's default)")

    def handle(self, *args: Any, **opts: Any) -> None:
        output = opts["output"]
        auth_file = opts["auth_file"] or (os.path.join(os.path.abspath(output), "userlist.txt") if output
                                          else "userlist.txt")
        try:
            config = build_config(settings.DATABASES, opts["aliases"], auth_file=auth_file,
                                  unix_socket_dir=opts["unix_socket_dir"], flavor=opts["flavor"],
                                  wildcard=not opts["no_wildcard"])
        except ConfigError as e:
            raise CommandError(str(e)) from e
        if not output:
            self.stdout.write("; ---- pgbouncer.ini ----")
            self.stdout.write(config.ini, ending="")
            self.stdout.write("; ---- userlist.txt ----")
            self.stdout.write(config.userlist, ending="")
            return
        ini, users = config.write(output)
        self.stdout.write(f"wrote {ini} and {users}; run: pgmux {ini}")
