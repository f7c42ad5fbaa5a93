"""Replay pacing by event time and the ``--time-range`` filter of ``streamrec replay``.

>>> r = TimeRange.parse("2026-01-01", "2026-01-01T00:10")
>>> r.end - r.start
600000
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple

import msgspec

from streams import schema
from streams.sources import formats


class Pacer:
    """Sleeps so that event time advances ``speed`` times faster than wall time, from the first event."""

    def __init__(self, speed: float):
        if not speed > 0:
            raise ValueError(f"replay: --speed must be > 0, got {speed}")
        self.speed = speed
        self.first_ts: int | None = None
        self.t0 = 0.0

    def wait(self, ts: int, heartbeat: Callable[[], None]) -> None:
        """Return when event time ``ts`` is due; long gaps are slept in steps of at most 0.5 s with a
        ``heartbeat()`` between them (stats keep flowing while the log is quiet)."""
        if self.first_ts is None:
            self.first_ts, self.t0 = ts, time.monotonic()
            return
        due = self.t0 + (ts - self.first_ts) / 1000.0 / self.speed
        while (delay := due - time.monotonic()) > 0:
            time.sleep(min(delay, 0.5))
            heartbeat()


class TimeRange(NamedTuple):
    """Replay only events with ``start <= ts < end`` (ms). Feedback (clicks, conversions) is kept until
    ``end + longest label window`` so impressions near ``end`` keep their labels; watermarks at or past
    ``end`` are dropped (the end-of-log watermark closes the windows)."""

    start: int
    end: int

    @classmethod
    def parse(cls, start: str, end: str) -> TimeRange:
        """From ms / s digits or ISO dates: ``TimeRange.parse("2026-01-01", "2026-01-02T06:00")``."""
        r = cls(formats.parse_time(start), formats.parse_time(end))
        if r.end <= r.start:
            raise ValueError(f"replay: --time-range END ({end}) must be after START ({start})")
        return r


def in_range(rec: msgspec.Struct, r: TimeRange, feedback_end: int) -> bool:
    ts = rec.ts  # type: ignore[attr-defined]
    if isinstance(rec, (schema.Click, schema.Conversion)):
        return r.start <= ts < feedback_end
    return r.start <= ts < r.end
