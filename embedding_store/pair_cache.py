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
negative model version, a ``ts`` more than :data:`~embedding_store.ttl_store.FUTURE_SLACK_MS` in the future (a
record from a future version of the FM's clock), and a ``model_version`` above ``max_version`` when the cache is
told the newest version that exists (``newest_version``: e.g. a VM that also receives the FM's teacher
predictions). What the cache shares with LoopFM's vector store (the bounded rows, decode / check / count on
arrival, the lookup's counters) is :mod:`embedding_store.ttl_store`.

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

import time

import numpy as np

from embedding_store.ttl_store import BoundedRows, TTLStore, ids_outside
from streams import schema


class PairCache(TTLStore):
    """See the module docstring (the common part: :class:`embedding_store.ttl_store.TTLStore`). Thread-safe: a
    consumer thread writes, the trainer's thread reads."""

    record_type = schema.SolarisPairs
    stale_counter = "expired"

    def __init__(self, ttl_s: float, max_entries: int = 2_000_000, initial: int = 4096):
        if max_entries < 1:
            raise ValueError(f"PairCache: max_entries must be >= 1, got {max_entries}")
        if ttl_s <= 0:
            raise ValueError(f"PairCache: ttl_s must be > 0, got {ttl_s}")
        super().__init__(int(ttl_s * 1000), {
            "records": 0, "written": 0, "older_ignored": 0, "expired_on_arrival": 0, "evictions": 0,
            "dead_letters": 0, "lookups": 0, "hits": 0, "misses": 0, "expired": 0})
        self.max_entries = max_entries
        self._rows = BoundedRows(2, max_entries, initial, "PairCache")  # (user, ad) -> (p_click, p_conversion)

    def __len__(self) -> int:
        return len(self._rows)

    # ---- writing -------------------------------------------------------------------------------
    def _put(self, users, ads, p_click, p_conversion, version: int, ts_ms: int) -> int:
        """:meth:`put` with the lock held."""
        rows = self._rows
        values = np.stack([np.asarray(p_click, np.float32), np.asarray(p_conversion, np.float32)], axis=1)
        keys = list(zip(np.asarray(users).tolist(), np.asarray(ads).tolist()))
        written, older = rows.put(keys, values, version, ts_ms, lambda r: rows.ts[r] > ts_ms)
        self.counters["written"] += written
        self.counters["older_ignored"] += older
        self.counters["evictions"] = rows.evicted
        self.newest_version = max(self.newest_version, version)
        return written

    def put(self, users, ads, p_click, p_conversion, version: int, ts_ms: int) -> int:
        """Store pairs computed by FM ``version`` at ``ts_ms`` (no checks: see :meth:`apply`); returns how many
        were written (a pair stored with a later ``ts`` keeps it)."""
        with self._lock:
            return self._put(users, ads, p_click, p_conversion, version, ts_ms)

    def check_record(self, rec: schema.SolarisPairs) -> str | None:
        n = len(rec.user_ids)
        lens = (len(rec.ad_ids), len(rec.p_click), len(rec.p_conversion))
        if any(x != n for x in lens):
            return f"shape: {n} user ids, {lens[0]} ad ids, {lens[1]} p_click, {lens[2]} p_conversion"
        return None

    def check_values(self, rec: schema.SolarisPairs) -> str | None:
        if ids_outside(rec.user_ids, rec.ad_ids):
            return "unknown id: user or ad id outside [0, 2**63)"
        if rec.user_ids:
            pc, pv = np.asarray(rec.p_click, np.float64), np.asarray(rec.p_conversion, np.float64)
            if not (np.isfinite(pc).all() and np.isfinite(pv).all()):
                return "probabilities hold NaN or infinite values"
            if pc.min() < 0 or pc.max() > 1 or pv.min() < 0 or pv.max() > 1:
                return "probabilities outside [0, 1]"
            if (pv > pc + 1e-6).any():
                return "p_conversion above p_click (it is the probability of click and conversion)"
        return None

    def keys_of(self, rec: schema.SolarisPairs) -> int:
        return len(rec.user_ids)

    def _store_record(self, rec: schema.SolarisPairs, now_ms: int) -> None:
        self._put(rec.user_ids, rec.ad_ids, rec.p_click, rec.p_conversion, rec.model_version, rec.ts)

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
            p, hit, age_ms = self._lookup(self._rows, keys, now_ms, count)
        p = np.where(hit[:, None], p, 0.0).astype(np.float32)
        return p[:, 0], p[:, 1], hit, np.where(hit, age_ms, 0) / 1000.0

    def stats(self, prefix: str = "solaris_") -> dict[str, float]:
        """Counters (since start) and gauges: ``entries``, ``hit_rate`` (hits / lookups, absent before the
        first lookup), ``age_p50_s`` over the most recent :data:`~embedding_store.ttl_store.AGE_WINDOW` hits,
        ``fm_version``."""
        with self._lock:
            out = self._stats(prefix)
            out[prefix + "entries"] = float(len(self._rows))
            if self.counters["lookups"]:
                out[prefix + "hit_rate"] = self.counters["hits"] / self.counters["lookups"]
        return out
