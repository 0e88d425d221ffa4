"""gunicorn settings for the example: sync workers, 127.0.0.1 only (override with env)."""

import os

import pgmux.django

bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
workers = int(os.environ.get("GUNICORN_WORKERS", "2"))
worker_class = "sync"
timeout = 30
graceful_timeout = 5
accesslog = None
loglevel = os.environ.get("GUNICORN_LOGLEVEL", "warning")
wsgi_app = "djangoapp.wsgi:application"


def post_fork(server, worker):
    # clears native psycopg pools inherited from the master (only matters with OPTIONS["pool"] + --preload)
    pgmux.django.post_fork(server, worker)
