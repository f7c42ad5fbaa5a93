"""SOLARIS's pair cache: the FM's predictions for (user id, ad id) pairs, computed ahead of the requests.

The precompute service (:mod:`trainer.solaris`, ``streamrec precompute``) predicts which pairs will be requested
soon, has the FM score them, and publishes :class:`~streams.schema.SolarisPairs` records to
``topics.solaris_pairs``; a VM trainer (``trainer.solaris``) keeps them here and reads them as input features, so
no FM inference runs on a VM's path::

    precompute --SolarisPairs--> topics.solaris_pairs --SolarisConsumer (thread)--> PairCache
                                                                  VM featurize --get--^

One entry per pair: ``(p_click, p_conversion, model_version, ts)``, ``ts`` the wall-clock ms the FM computed it.
:meth:`PairCache.get` is vectorised: ``(users, ads, now)`` -> values, a hit mask and ages. A pair that is absent
is a *miss*; one older than ``ttl_s`` is *expired* (also not a hit). Counted per pair looked up, with the ages
of the most recent hits (their median: ``age_p50_s``).

Writes: a record's entry replaces the stored one unless the stored one was computed later (``ts``; messages
arrive out of order across partitions; ``older_ignored``); version numbers are not compared (an FM started over
counts from 0 again). A record already older than ``ttl_s`` is not stored (``expired_on_arrival``).

Bounded: at most ``max_entries`` pairs; past it the pair written least recently leaves first (LRU by write:
lookups do not refresh, which keeps them cheap; a pair the service keeps recomputing stays). Memory per pair is
~24 bytes of values and ~200 of index (a dict entry keyed by a tuple of two ints): ~0.45 GB at the default
2,000,000 (``solaris.max_entries``). Arrays grow by doubling up to the bound.

Bad records (:meth:`PairCache.check`) are refused whole, with a reason for the dead letter: columns of
different lengths, probabilities that are NaN or outside [0, 1] (or a conversion probability above the click
probability: the FM predicts click-and-conversion), ids outside ``[0, 2**63)`` (unknown to every id space), a
negative model version, a ``ts`` more than :data:`FUTURE_SLACK_MS` in the future (a record from a future
version of the FM's clock), and a ``model_version`` above ``max_version`` when the cache is told the newest
version that exists (``newest_version``: e.g. a VM that also receives the FM's teacher predictions).

>>> c = PairCache(ttl_s=60, max_entries=2)
>>> c.put([7, 7], [1, 2], [0.2, 0.5], [0.01, 0.1], version=3, ts_ms=1_000)
2
>>> pc, pv, hit, age = c.get([7, 7, 8], [1, 3, 1], now_ms=31_000)
>>> pc.tolist(), hit.tolist(), age.tolist()
([0.20000000298023224, 0.0, 0.0], [True, False, False], [30.0, 0.0, 0.0])
>>> c.get([7], [2], now_ms=62_000)[2].tolist()   # 61 s old: expired
[False]
>>> c.put([9], [9], [0.3], [0.0], version=4, ts_ms=62_000)    # the bound: (7, 1) was written first, it leaves
1
>>> len(c), c.counters["evictions"], c.counters["hits"], c.counters["misses"], c.counters["expired"]
(2, 1, 1, 2, 1)
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque

import numpy as np

from streams import schema

FUTURE_SLACK_MS = 300_000  # clocks of the service's and the VM's machines may differ this much
AGE_WINDOW = 10_000  # ages of the most recent hits kept for the median
_ID_MAX = 2 ** 63


class PairCache:
    """See the module docstring. Thread-safe: a consumer thread writes, the trainer's thread reads."""

    def __init__(self, ttl_s: float, max_entries: int = 2_000_000, initial: int = 4096):
        if max_entries < 1:
            raise ValueError(f"PairCache: max_entries must be >= 1, got {max_entries}")
        if ttl_s <= 0:
            raise ValueError(f"PairCache: ttl_s must be > 0, got {ttl_s}")
        self.ttl_ms, self.max_entries = int(ttl_s * 1000), max_entries
        self._row: OrderedDict[tuple[int, int], int] = OrderedDict()  # pair -> row, least recently written first
        n = min(initial, max_entries)
        self._p = np.zeros((n, 2), np.float32)
        self._version = np.zeros(n, np.int64)
        self._ts = np.zeros(n, np.int64)
        self._lock = threading.Lock()
        self.max_version: int | None = None  # set: records of a newer FM version are refused (see check)
        self.newest_version = -1
        self.counters = {"records": 0, "written": 0, "older_ignored": 0, "expired_on_arrival": 0, "evictions": 0,
                         "dead_letters": 0, "lookups": 0, "hits": 0, "misses": 0, "expired": 0}
        self._ages: deque[np.ndarray] = deque()
        self._ages_n = 0

    def __len__(self) -> int:
        return len(self._row)

    # ---- writing -------------------------------------------------------------------------------
    def _new_row(self) -> int:
        if len(self._row) >= self.max_entries:  # full: reuse the least recently written pair's row
            _, r = self._row.popitem(last=False)
            self.counters["evictions"] += 1
            return r
        r = len(self._row)  # rows are freed only by eviction: live pairs hold rows 0 .. len-1
        if r >= len(self._ts):
            n = min(2 * len(self._ts), self.max_entries)
            self._p = np.concatenate([self._p, np.zeros((n - len(self._p), 2), np.float32)])
            self._version = np.concatenate([self._version, np.zeros(n - len(self._version), np.int64)])
            self._ts = np.concatenate([self._ts, np.zeros(n - len(self._ts), np.int64)])
        return r

    def put(self, users, ads, p_click, p_conversion, version: int, ts_ms: int) -> int:
        """Store pairs computed by FM ``version`` at ``ts_ms`` (no checks: see :meth:`apply`); returns how many
        were written (a pair stored with a later ``ts`` keeps it)."""
        pc = np.asarray(p_click, np.float32)
        pv = np.asarray(p_conversion, np.float32)
        written = 0
        with self._lock:
            for j, key in enumerate(zip(np.asarray(users).tolist(), np.asarray(ads).tolist())):
                r = self._row.get(key)
                if r is None:
                    r = self._new_row()
                    self._row[key] = r
                elif self._ts[r] > ts_ms:
                    self.counters["older_ignored"] += 1
                    continue
                else:
                    self._row.move_to_end(key)
                self._p[r, 0], self._p[r, 1] = pc[j], pv[j]
                self._version[r], self._ts[r] = version, ts_ms
                written += 1
            self.counters["written"] += written
            self.newest_version = max(self.newest_version, version)
        return written

    def check(self, rec: schema.SolarisPairs, now_ms: int) -> str | None:
        """Why ``rec`` is refused (a dead letter's reason), or None."""
        n = len(rec.user_ids)
        lens = (len(rec.ad_ids), len(rec.p_click), len(rec.p_conversion))
        if any(x != n for x in lens):
            return f"shape: {n} user ids, {lens[0]} ad ids, {lens[1]} p_click, {lens[2]} p_conversion"
        if rec.model_version < 0:
            return f"model_version {rec.model_version} < 0"
        if self.max_version is not None and rec.model_version > self.max_version:
            return f"model_version {rec.model_version} is from the future (the newest FM version is {self.max_version})"
        if rec.ts > now_ms + FUTURE_SLACK_MS:
            return f"ts {rec.ts} is {(rec.ts - now_ms) / 1000:.0f}s in the future"
        if n and (min(rec.user_ids) < 0 or max(rec.user_ids) >= _ID_MAX
                  or min(rec.ad_ids) < 0 or max(rec.ad_ids) >= _ID_MAX):
            return "unknown id: user or ad id outside [0, 2**63)"
        if n:
            pc, pv = np.asarray(rec.p_click, np.float64), np.asarray(rec.p_conversion, np.float64)
            if not (np.isfinite(pc).all() and np.isfinite(pv).all()):
                return "probabilities hold NaN or infinite values"
            if pc.min() < 0 or pc.max() > 1 or pv.min() < 0 or pv.max() > 1:
                return "probabilities outside [0, 1]"
            if (pv > pc + 1e-6).any():
                return "p_conversion above p_click (it is the probability of click and conversion)"
        return None

    def apply(self, rec: schema.SolarisPairs, now_ms: int | None = None) -> str | None:
        """Store a decoded record; returns the reason when it is refused (nothing stored), else None."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        reason = self.check(rec, now_ms)
        with self._lock:
            if reason is not None:
                self.counters["dead_letters"] += 1
                return reason
            self.counters["records"] += 1
            if rec.ts < now_ms - self.ttl_ms:
                self.counters["expired_on_arrival"] += len(rec.user_ids)
                return None
        self.put(rec.user_ids, rec.ad_ids, rec.p_click, rec.p_conversion, rec.model_version, rec.ts)
        return None

    def apply_raw(self, raw: bytes, now_ms: int | None = None) -> str | None:
        """Decode and :meth:`apply` one message's bytes; the reason when refused."""
        rec = schema.decode(raw, schema.SolarisPairs)
        if isinstance(rec, schema.Invalid):
            with self._lock:
                self.counters["dead_letters"] += 1
            return rec.reason
        return self.apply(rec, now_ms)

    # ---- reading -------------------------------------------------------------------------------
    def get(self, users, ads, now_ms=None, count: bool = True
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(p_click (N,) float32, p_conversion (N,) float32, hit (N,) bool, age_s (N,) float64) of the pairs
        ``(users[i], ads[i])`` at ``now_ms`` (one time, or one per pair): zeros where not a hit (absent, or
        older than ``ttl_s``).
        ``count``: add the lookups to the counters (False: a peek, e.g. the service asking what is fresh)."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        keys = list(zip(np.asarray(users).tolist(), np.asarray(ads).tolist()))
        with self._lock:
            get = self._row.get
            rows = np.fromiter((get(k, -1) for k in keys), np.int64, len(keys))
            found = rows >= 0
            r = np.maximum(rows, 0)
            age_ms = np.where(found, np.asarray(now_ms, np.int64) - self._ts[r], 0)
            hit = found & (age_ms <= self.ttl_ms)
            p = np.where(hit[:, None], self._p[r], 0.0).astype(np.float32)
            if count:
                self.counters["lookups"] += len(keys)
                self.counters["hits"] += int(hit.sum())
                self.counters["misses"] += int((~found).sum())
                self.counters["expired"] += int((found & ~hit).sum())
                if hit.any():
                    self._ages.append(age_ms[hit])
                    self._ages_n += int(hit.sum())
                    while self._ages_n - len(self._ages[0]) >= AGE_WINDOW:
                        self._ages_n -= len(self._ages.popleft())
        return p[:, 0], p[:, 1], hit, np.where(hit, age_ms, 0) / 1000.0

    def stats(self, prefix: str = "solaris_") -> dict[str, float]:
        """Counters (since start) and gauges: ``entries``, ``hit_rate`` (hits / lookups, absent before the
        first lookup), ``age_p50_s`` over the most recent :data:`AGE_WINDOW` hits, ``fm_version``."""
        with self._lock:
            out = {prefix + k: float(v) for k, v in self.counters.items()}
            out[prefix + "entries"] = float(len(self._row))
            out[prefix + "fm_version"] = float(self.newest_version)
            if self.counters["lookups"]:
                out[prefix + "hit_rate"] = self.counters["hits"] / self.counters["lookups"]
            if self._ages:
                out[prefix + "age_p50_s"] = float(np.percentile(np.concatenate(self._ages), 50)) / 1000.0
        return out
