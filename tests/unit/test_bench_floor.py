"""bench/floor.py's forwarder is the yardstick for pgmux's CPU per transaction, so it must do the
work it claims: walk every header of both directions, whatever the read boundaries."""

from __future__ import annotations

import random

import pytest

from bench import floor
from pgmux.protocol import messages as m

ANSWER = (m.row_description([("a", 23)]) + m.data_row(["x" * 200]) + m.command_complete("SELECT 1")
          + m.ready_for_query(b"I"))


@pytest.mark.parametrize("client_side", [True, False])
def test_forwarder_walks_every_message_at_random_split_points(client_side: bool, monkeypatch) -> None:
    seen: list[int] = []
    real_scan = floor.scan

    def counting_scan(buf, pos, end, need, notify, events):  # type: ignore[no-untyped-def]
        result = real_scan(buf, pos, end, need, notify, events)
        seen.extend(e[0] for e in events)
        return result

    monkeypatch.setattr(floor, "scan", counting_scan)
    rng = random.Random(8)
    for _ in range(200):
        seen.clear()
        half = floor.Half(untyped_first=client_side)
        stream = (m.startup_message({"user": "u"}) if client_side else b"") + ANSWER * 20
        pos = 0
        while pos < len(stream):
            chunk = stream[pos : pos + rng.randint(1, 40)]
            pos += len(chunk)
            half.get_buffer(-1)[: len(chunk)] = chunk
            half.buffer_updated(len(chunk))
        assert seen.count(ord("Z")) == 20
        assert half.keep == 0 and half.skip == 0
        assert b"".join(half.early) == stream  # no peer: everything was kept for it, unchanged
