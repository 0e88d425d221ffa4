"""pgmux: a PostgreSQL connection pooler, drop-in compatible with PgBouncer."""

__version__ = "0.1.0"
