"""A bounded, TTL'd store of what a topic carries: the base of LoopFM's vector store and SOLARIS's pair cache.

Both keep, per key, a fixed-width row of float32 values with the model version that computed it and ``ts``, the
wall-clock ms it was computed at; both are fed record by record from a topic by a consumer thread
(:class:`streams.bus.feed.TopicFeed`, ``apply_raw``) and read by the trainer's thread; both refuse bad records
with a reason for the dead letter, skip records already older than the TTL, and count what they saw. What is
common lives here, what differs in the subclasses
(:class:`embedding_store.fm_embeddings.FMEmbeddingStore`, :class:`embedding_store.pair_cache.PairCache`)::

    raw --decode--> rec --check(rec, now)--> reason: dead letter (counted, nothing stored)
                          |
                          None: counted as a record; ts older than the TTL: expired on arrival (per key);
                                else _store_record(rec, now) writes its keys' rows (under the lock)

* :class:`BoundedRows`: key -> row of ``(values (width,) float32, version, ts)``, at most ``capacity`` keys; past
  it the key written least recently leaves first (LRU by write: lookups do not refresh, which keeps them cheap).
  Rows are freed only by eviction (live keys hold rows ``0 .. len - 1``); the arrays grow by doubling up to the
  bound. Whether a stored row keeps its place against a new write is the caller's rule (``keeps``: SOLARIS keeps
  the later ``ts``, LoopFM the newer version unless it is stale). Not locked: its store serialises access.
* :class:`TTLStore`: the lock, the counters, :meth:`~TTLStore.apply` / :meth:`~TTLStore.apply_raw` (decode,
  :meth:`~TTLStore.check`, count, store), the checks every record gets (model version >= 0, not newer than
  ``max_version`` when set, ``ts`` at most :data:`FUTURE_SLACK_MS` ahead), and the lookup's bookkeeping: a key
  absent is a *miss*, one older than the TTL is stale (not a hit), counted per key looked up, with the ages of the
  most recent :data:`AGE_WINDOW` hits kept for their median.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from typing import Callable, Hashable

import numpy as np

from streams import schema

FUTURE_SLACK_MS = 300_000  # clocks of the publisher's and the reader's machines may differ this much
AGE_WINDOW = 10_000  # ages of the most recent hits kept for the median
ID_MAX = 2 ** 63  # ids are in [0, ID_MAX): outside it, unknown to every id space


def ids_outside(*columns) -> bool:
    """Whether any id of the (non-empty) columns is outside ``[0, 2**63)``."""
    return any(len(c) and (min(c) < 0 or max(c) >= ID_MAX) for c in columns)


class BoundedRows:
    """key -> ``(values, version, ts)`` rows, at most ``capacity`` keys (module docstring)."""

    def __init__(self, width: int, capacity: int, initial: int, owner: str = "BoundedRows"):
        if capacity < 1:
            raise ValueError(f"{owner}: capacity must be >= 1, got {capacity}")
        self.width, self.capacity = width, capacity
        self._row: OrderedDict[Hashable, int] = OrderedDict()  # key -> row, least recently written first
        n = min(initial, capacity)
        self.values = np.zeros((n, width), np.float32)
        self.version = np.zeros(n, np.int64)
        self.ts = np.zeros(n, np.int64)
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._row)

    def _new_row(self) -> int:
        if len(self._row) >= self.capacity:  # full: reuse the least recently written key's row
            _, r = self._row.popitem(last=False)
            self.evicted += 1
            return r
        r = len(self._row)
        if r >= len(self.ts):
            n = min(2 * len(self.ts), self.capacity)
            self.values = np.concatenate([self.values, np.zeros((n - len(self.values), self.width), np.float32)])
            self.version = np.concatenate([self.version, np.zeros(n - len(self.version), np.int64)])
            self.ts = np.concatenate([self.ts, np.zeros(n - len(self.ts), np.int64)])
        return r

    def put(self, keys: list, values, version: int, ts: int, keeps: Callable[[int], bool]) -> tuple[int, int]:
        """Write ``values[j]`` for ``keys[j]`` (computed by ``version`` at ``ts``); a key whose stored row
        ``keeps(row)`` is left as it is. Returns (written, left)."""
        written = left = 0
        for j, key in enumerate(keys):
            r = self._row.get(key)
            if r is None:
                r = self._new_row()
                self._row[key] = r
            elif keeps(r):
                left += 1
                continue
            else:
                self._row.move_to_end(key)
            self.values[r] = values[j]
            self.version[r], self.ts[r] = version, ts
            written += 1
        return written, left

    def get(self, keys: list) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(values (N, width) float32, found (N,) bool, version (N,), ts (N,)); zeros (version -1) where absent."""
        get = self._row.get
        rows = np.fromiter((get(k, -1) for k in keys), np.int64, len(keys))
        found = rows >= 0
        r = np.maximum(rows, 0)
        values = np.where(found[:, None], self.values[r], 0.0).astype(np.float32, copy=False)
        return values, found, np.where(found, self.version[r], -1), np.where(found, self.ts[r], 0)


class TTLStore:
    """The common part of a topic-fed, bounded, TTL'd store (module docstring). A subclass sets ``record_type``
    (the :mod:`streams.schema` struct it keeps), ``counters`` (its names; this class uses ``records``,
    ``expired_on_arrival``, ``dead_letters``, ``lookups``, ``misses``, ``stale_counter`` and ``hits`` where
    present), and writes :meth:`check_record` (its own reasons), :meth:`keys_of` and :meth:`_store_record`.
    Thread-safe: :meth:`apply` holds the lock while it counts and stores."""

    record_type: type
    stale_counter = "stale"  # the counter of keys found but older than the TTL

    def __init__(self, ttl_ms: int, counters: dict[str, int]):
        self.ttl_ms = ttl_ms
        self.counters = counters
        self._lock = threading.Lock()
        self.max_version: int | None = None  # set: records of a newer model version are refused (see check)
        self.newest_version = -1
        self._ages: deque[np.ndarray] = deque()
        self._ages_n = 0

    # ---- writing (the consumer thread) ---------------------------------------------------------
    def check_record(self, rec) -> str | None:
        """The subclass's reasons that come before the clock's (shape, kind, ...), or None."""
        return None

    def check_values(self, rec) -> str | None:
        """The subclass's reasons that come after the clock's (ids, values), or None."""
        return None

    def check(self, rec, now_ms: int) -> str | None:
        """Why ``rec`` is refused (a dead letter's reason), or None."""
        reason = self.check_record(rec)
        if reason is not None:
            return reason
        if rec.model_version < 0:
            return f"model_version {rec.model_version} < 0"
        if self.max_version is not None and rec.model_version > self.max_version:
            return f"model_version {rec.model_version} is from the future (the newest FM version is {self.max_version})"
        if rec.ts > now_ms + FUTURE_SLACK_MS:
            return f"ts {rec.ts} is {(rec.ts - now_ms) / 1000:.0f}s in the future"
        return self.check_values(rec)

    def keys_of(self, rec) -> int:
        """How many keys ``rec`` carries (what ``expired_on_arrival`` counts)."""
        raise NotImplementedError

    def _store_record(self, rec, now_ms: int) -> None:
        """Write a checked record that is within the TTL (called with the lock held)."""
        raise NotImplementedError

    def apply(self, rec, now_ms: int | None = None) -> str | None:
        """Store a decoded record; returns the reason when it is refused (nothing stored), else None."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        reason = self.check(rec, now_ms)
        with self._lock:
            if reason is not None:
                self.counters["dead_letters"] += 1
                return reason
            self.counters["records"] += 1
            if rec.ts < now_ms - self.ttl_ms:
                self.counters["expired_on_arrival"] += self.keys_of(rec)
                return None
            self._store_record(rec, now_ms)
        return None

    def apply_raw(self, raw: bytes, now_ms: int | None = None) -> str | None:
        """Decode and :meth:`apply` one message's bytes; the reason when refused."""
        rec = schema.decode(raw, self.record_type)
        if isinstance(rec, schema.Invalid):
            with self._lock:
                self.counters["dead_letters"] += 1
            return rec.reason
        return self.apply(rec, now_ms)

    # ---- reading (the trainer's thread) --------------------------------------------------------
    def _lookup(self, rows: BoundedRows, keys: list, now_ms, count: bool = True
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(values (N, width), fresh (N,) bool, age_ms (N,)) of ``keys`` at ``now_ms`` (one time, or one per key);
        values as stored (the caller zeroes what is not fresh). With the lock held; ``count``: add the lookups
        to the counters and the fresh ones' ages to the window."""
        values, found, _, ts = rows.get(keys)
        age_ms = np.where(found, np.asarray(now_ms, np.int64) - ts, 0)
        fresh = found & (age_ms <= self.ttl_ms)
        if count:
            c = self.counters
            c["lookups"] += len(keys)
            if "hits" in c:
                c["hits"] += int(fresh.sum())
            c["misses"] += int((~found).sum())
            c[self.stale_counter] += int((found & ~fresh).sum())
            if fresh.any():
                self._ages.append(age_ms[fresh])
                self._ages_n += int(fresh.sum())
                while self._ages_n - len(self._ages[0]) >= AGE_WINDOW:
                    self._ages_n -= len(self._ages.popleft())
        return values, fresh, age_ms

    def _stats(self, prefix: str) -> dict[str, float]:
        """Counters (since start) and ``fm_version`` named ``prefix + name``; ``age_p50_s`` over the most recent
        :data:`AGE_WINDOW` hits (absent before the first). With the lock held."""
        out = {prefix + k: float(v) for k, v in self.counters.items()}
        out[prefix + "fm_version"] = float(self.newest_version)
        if self._ages:
            out[prefix + "age_p50_s"] = float(np.percentile(np.concatenate(self._ages), 50)) / 1000.0
        return out
