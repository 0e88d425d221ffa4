"""Helpers shared by the ResponseTracker unit tests (imported by name, like helpers_tx)."""

from __future__ import annotations

from pgmux.protocol.prepared import ResponseTracker

# the frontend message types a test requests, by their type letters
P, B, D, E, C, S, Q = (ord(x) for x in "PBDECSQ")


def feed(tracker: ResponseTracker, answers: str) -> str:
    """Feed the server's answers (type letters) to `tracker`: the answers the client sees, in order,
    with the ones pgmux invents marked ``<letter>*``."""
    seen = []
    for a in answers:
        extra: list[bytes] = []
        if tracker.answer(ord(a), extra):
            seen.append(a)
        seen.extend(chr(x[0]) + "*" for x in extra)
    return "".join(seen)
