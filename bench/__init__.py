"""pgmux benchmark suite: pgmux against PgBouncer and direct PostgreSQL, side by side (``python -m bench.run``)."""
