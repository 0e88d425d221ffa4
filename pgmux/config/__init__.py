"""pgmux.config: reads pgbouncer.ini exactly as PgBouncer does, into typed objects.

Modules: ``ini`` (libusual's INI dialect and %include), ``connstr`` (the ``key=value`` strings of
[databases]/[users]/[peers]), ``settings`` (the [pgbouncer] table, parsing, SHOW CONFIG),
``loader`` (sections to a Config), ``errors`` (ConfigError, always located as file:line: key).
"""

from pgmux.config.errors import ConfigError
from pgmux.config.loader import (
    Config,
    DatabaseEntry,
    PeerEntry,
    UserEntry,
    load_config,
    load_config_text,
)
from pgmux.config.settings import SETTINGS, SettingDef, Settings, lookup_setting

__all__ = [
    "SETTINGS",
    "Config",
    "ConfigError",
    "DatabaseEntry",
    "PeerEntry",
    "SettingDef",
    "Settings",
    "UserEntry",
    "load_config",
    "load_config_text",
    "lookup_setting",
]
