"""pgmux.admin: the admin console (virtual database ``pgbouncer``), compatible with PgBouncer's.

Modules: ``commands`` (the console grammar, sans-I/O), ``show`` (every SHOW as data from the pooler's
state), ``control`` (who may run what, error texts, the control commands), ``result`` (result sets
and their text/binary encoding), ``peer`` (SO_PEERCRED, TLS details) and ``console`` (login and the protocol loop).
"""
