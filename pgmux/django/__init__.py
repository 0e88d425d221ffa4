"""Django integration of pgmux (install with ``pip install 'pgmux[django]'``).

* ``pgmux.django.database(...)``: a ``DATABASES`` entry for a database behind pgmux (no Django import).
* ``INSTALLED_APPS += ["pgmux.django"]``: system checks (``pgmux.E0xx``/``W0xx``) and the management
  commands ``pgmux`` (run the pooler from settings), ``pgmux_config`` and ``pgmux_stats``.
* ``path("pgmux/", include("pgmux.django.urls"))``: ``health`` and ``metrics`` views.

pgmux's core never imports this package.
"""

from pgmux.django.settings import dashboard_url, database, direct, pgmux_options

__all__ = ["dashboard_url", "database", "direct", "pgmux_options", "post_fork"]


def post_fork(server: object = None, worker: object = None) -> None:
    """gunicorn ``post_fork`` hook: forget native psycopg pools inherited from the master (Django #36957).

    Only matters with ``OPTIONS["pool"]`` and ``--preload``; harmless otherwise.
    """
    try:
        from django.db.backends.postgresql.base import DatabaseWrapper
    except Exception:  # Django or psycopg missing: nothing to clear
        return
    pools = getattr(DatabaseWrapper, "_connection_pools", None)
    if pools:
        pools.clear()
