"""pgmux's data path in compiled code (Cython): see _engine.pxd for the seam with Python.

`Engine` owns an epoll set registered once in the asyncio loop; `Link` is the base class of every
connection whose socket it may own (ClientConnection, ServerConnection); `PoolStats` holds the
counters the engine adds to in C. docs/architecture.md shows where this sits.
"""

from pgmux.engine._engine import (
    C_LOGIN_STARTUP,
    LAZY_PREPARE,
    PIN_HINTS,
    SESSION,
    TRACKED,
    Acceptor,
    Engine,
    EngineTransport,
    Link,
    PoolCore,
    PoolStats,
    Statement,
)

__all__ = [
    "C_LOGIN_STARTUP", "Acceptor", "Engine", "EngineTransport", "LAZY_PREPARE", "Link", "PIN_HINTS", "PoolCore",
    "PoolStats",
    "SESSION", "Statement", "TRACKED",
]
