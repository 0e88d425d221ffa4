"""Settings of the pgmux example project; the database comes from the environment.

DJANGOAPP_MODE picks how Django reaches PostgreSQL (the benchmark compares them):

``pgmux``      (default) through pgmux in transaction mode, via pgmux.django.database()
``pgbouncer``  through PgBouncer in transaction mode (no pinning: server-side cursors off)
``direct``     straight to PostgreSQL (CONN_MAX_AGE from DJANGOAPP_CONN_MAX_AGE, default 0)
``pool``       straight to PostgreSQL with Django's native pool (min_size 1, max_size 2 per process)

PGMUX_HOST/PGMUX_PORT: where the pooler listens (127.0.0.1:6432); PG_HOST/PG_PORT: PostgreSQL
(127.0.0.1:5432); DJANGOAPP_DB_NAME/_USER/_PASSWORD: database and role (shop/shop/shop);
DJANGOAPP_PREPARED=1: server-side binding with protocol-level prepared statements through the pooler;
DJANGOAPP_SERVER_SIDE_CURSORS=1/0: force server-side cursors on/off (the benchmark's misconfiguration row).
"""

import os
from pathlib import Path

import pgmux.django

BASE_DIR = Path(__file__).resolve().parent.parent
SECRET_KEY = os.environ.get("DJANGOAPP_SECRET_KEY", "example-only-not-secret")
DEBUG = os.environ.get("DJANGOAPP_DEBUG", "") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "testserver"]

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "pgmux.django",
    "shop",
]
MIDDLEWARE = ["django.middleware.common.CommonMiddleware"]
ROOT_URLCONF = "djangoapp.urls"
WSGI_APPLICATION = "djangoapp.wsgi.application"
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
TEMPLATES: list = []

MODE = os.environ.get("DJANGOAPP_MODE", "pgmux")
NAME = os.environ.get("DJANGOAPP_DB_NAME", "shop")
USER = os.environ.get("DJANGOAPP_DB_USER", "shop")
PASSWORD = os.environ.get("DJANGOAPP_DB_PASSWORD", "shop")
PG_HOST = os.environ.get("PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("PG_PORT", "5432"))
CONN_MAX_AGE = os.environ.get("DJANGOAPP_CONN_MAX_AGE")

if MODE in ("pgmux", "pgbouncer"):
    default = pgmux.django.database(
        NAME,
        USER,
        PASSWORD,
        host=os.environ.get("PGMUX_HOST", "127.0.0.1"),
        port=int(os.environ.get("PGMUX_PORT", "6432")),
        server_host=PG_HOST,
        server_port=PG_PORT,
        pooler=MODE,
        conn_max_age=int(CONN_MAX_AGE) if CONN_MAX_AGE is not None else None,
        prepared_statements=os.environ.get("DJANGOAPP_PREPARED", "") == "1",
        server_side_cursors={"1": True, "0": False}.get(os.environ.get("DJANGOAPP_SERVER_SIDE_CURSORS", "")),
        pool_settings={"default_pool_size": int(os.environ.get("PGMUX_POOL_SIZE", "4"))},
    )
elif MODE in ("direct", "pool"):
    default = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": NAME,
        "USER": USER,
        "PASSWORD": PASSWORD,
        "HOST": PG_HOST,
        "PORT": str(PG_PORT),
        "CONN_MAX_AGE": int(CONN_MAX_AGE or 0),
        "OPTIONS": {"pool": {"min_size": 1, "max_size": 2}} if MODE == "pool" else {},
    }
else:
    raise ValueError(f"DJANGOAPP_MODE must be pgmux, pgbouncer, direct or pool, not {MODE!r}")

DATABASES = {"default": default}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"django.request": {"handlers": ["console"], "level": "ERROR"}},
}
