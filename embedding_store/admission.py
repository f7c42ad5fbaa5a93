"""Admission and eviction decisions for an endless stream of ids (pure numpy functions).

* Admission: a slot shares its table's row until it was seen ``admit_hits`` times (the store counts
  candidates' sightings in a bounded count-min sketch, :class:`embedding_store.slotmap.CountMinSketch`; it
  keeps no per-slot counters), then gets its own row,
  in the widest pool whose rows for every candidate still fit the free budget (a store with room gives new
  ids full width at once; a full one gives the smallest width, most-hit first); resizing rebalances later.
* Eviction: a private row unseen for more than ``ttl`` steps goes back to the shared row and frees its
  storage, unless its importance is positive and at or above the floor (the ``protect_quantile`` of live rows).

>>> import numpy as np
>>> admit_mask(np.array([0, 1, 3, 5]), np.array([False, False, False, True]), 2).tolist()
[False, False, True, False]
>>> admit_plan(3, free_bytes=210.0, row_bytes=np.array([36, 68, 132, 260])).tolist()  # 3 rows of 16 dims fit
[1, 3]
>>> admit_plan(9, free_bytes=200.0, row_bytes=np.array([36, 68, 132, 260])).tolist()  # only 5 of 8 dims
[0, 5]
>>> w = init_rows(np.array([7, 7, 8]), width=4, dim=64, init_range=0.01, seed=0)
>>> bool((w[0] == w[1]).all()), bool((w[0] != w[2]).any()), bool((np.abs(w) < 0.01).all())
(True, True, True)
>>> m, floor = evict_mask(np.array([0, 0, 90]), 100, 50, np.array([0.5, 9.0, 1.0]), np.ones(3, bool), 0.5)
>>> m.tolist(), floor
([True, False, False], 1.0)
"""

from __future__ import annotations

import numpy as np

from embedding_store.ids import splitmix64


def admit_mask(hits: np.ndarray, admitted: np.ndarray, admit_hits: int) -> np.ndarray:
    """Slots (N,) that earn a private row now: not admitted, seen at least once and ``>= admit_hits`` times."""
    return ~admitted & (hits > 0) & (hits >= admit_hits)


def evict_mask(last_seen: np.ndarray, now: int, ttl: int, imp: np.ndarray, live: np.ndarray,
               protect_quantile: float) -> tuple[np.ndarray, float]:
    """(rows to evict (N,) bool, the importance floor). Stale = ``now - last_seen > ttl``; rows with
    ``imp >= floor`` are never evicted, where floor = the ``protect_quantile`` of ``imp`` over live rows
    (a row with zero importance is never protected, even when most rows tie at zero)."""
    if not live.any():
        return np.zeros_like(live), float("inf")
    floor = float(np.quantile(imp[live], protect_quantile))
    stale = (now - last_seen.astype(np.int64)) > ttl
    return live & stale & ((imp < floor) | (imp <= 0)), floor


def admit_plan(n: int, free_bytes: float, row_bytes: np.ndarray) -> np.ndarray:
    """``[pool, k]``: admit ``k <= n`` candidates (most-hit first) into ``pool``: the widest pool where all ``n``
    fit in ``free_bytes``, else as many as fit in the smallest (``row_bytes`` (P,) ascending)."""
    for p in range(len(row_bytes) - 1, -1, -1):
        if n * int(row_bytes[p]) <= free_bytes:
            return np.array([p, n])
    return np.array([0, max(min(int(free_bytes // int(row_bytes[0])), n), 0)])


def init_rows(slots: np.ndarray, width: int, dim: int, init_range: float, seed: int) -> np.ndarray:
    """Initial weights (K, width) float32 of global ``slots`` (K,): uniform in ``[-init_range, init_range)``,
    a pure function of (seed, slot, column) (a slot's column ``c`` gets the same value in any pool, in the
    pooled store and in its reference twin; ``dim``: the full row width)."""
    key = (np.asarray(slots, dtype=np.uint64)[:, None] * np.uint64(dim) + np.arange(width, dtype=np.uint64)
           + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15))
    u = (splitmix64(key.ravel()) >> np.uint64(40)).astype(np.float64) / float(1 << 24)  # [0, 1), 24 bits
    return ((2.0 * u - 1.0) * init_range).astype(np.float32).reshape(len(slots), width)
