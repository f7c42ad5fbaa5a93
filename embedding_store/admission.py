"""Admission and eviction decisions for an endless stream of ids (pure numpy functions).

* Admission: a slot shares its table's row until it was seen ``admit_hits`` times, then gets its own row
  (in the smallest pool; resizing may widen it later).
* Eviction: a private row unseen for more than ``ttl`` steps goes back to the shared row and frees its
  storage, unless its importance is positive and at or above the floor (the ``protect_quantile`` of live rows).

>>> import numpy as np
>>> admit_mask(np.array([0, 1, 3, 5]), np.array([False, False, False, True]), 2).tolist()
[False, False, True, False]
>>> m, floor = evict_mask(np.array([0, 0, 90]), 100, 50, np.array([0.5, 9.0, 1.0]), np.ones(3, bool), 0.5)
>>> m.tolist(), floor
([True, False, False], 1.0)
"""

from __future__ import annotations

import numpy as np


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
