"""Row importance and the budgeted choice of each row's width (pure numpy functions).

Importance is the gradient energy a row received, read for free from row-wise Adagrad: every update adds
``mean(g**2)`` to the row's momentum, so ``momentum_now - momentum_at_last_resize`` is the energy since the
last resize (frequent *and* informative rows score high; a row whose gradients vanish fades with ``decay``).

>>> import numpy as np
>>> update_importance(np.array([1.0, 2.0]), np.array([5.0, 3.0]), np.array([4.0, 3.0]), decay=0.5).tolist()
[1.5, 1.0]
>>> assign_pools(np.array([0.0, 1.0, 100.0]), pool_chunks=(1, 2, 4, 8), chunk_dim=8,
...              budget_bytes=4 * (9 + 17 + 65)).tolist()
[0, 1, 3]
"""

from __future__ import annotations

import numpy as np


def update_importance(imp: np.ndarray, mom_now: np.ndarray, mom_snap: np.ndarray, decay: float) -> np.ndarray:
    """``decay * imp + (mom_now - mom_snap)`` (all (N,) float32); negative deltas (a moved row) count 0."""
    return (decay * imp + np.maximum(mom_now - mom_snap, 0.0)).astype(np.float32)


def row_bytes(pool_chunks: tuple[int, ...], chunk_dim: int) -> np.ndarray:
    """Bytes of one row in each pool: float32 weights + one float32 row-wise Adagrad momentum, shape (P,)."""
    return 4 * (np.asarray(pool_chunks, dtype=np.int64) * chunk_dim + 1)


def pools_for(scale: float, s: np.ndarray, pool_chunks: tuple[int, ...]) -> np.ndarray:
    """Pool index of each row when it wants ``scale * s`` chunks, rounded up to an allowed count."""
    want = np.ceil(scale * s)
    return np.minimum(np.searchsorted(np.asarray(pool_chunks), want, side="left"), len(pool_chunks) - 1)


def assign_pools(imp: np.ndarray, pool_chunks: tuple[int, ...], chunk_dim: int, budget_bytes: float,
                 power: float = 0.5, iters: int = 48) -> np.ndarray:
    """Pool index (N,) int64 for rows of importance ``imp`` (N,) so their bytes fit ``budget_bytes``.

    A row asks for chunks proportional to ``imp ** power``; one global scale, found by bisection, is the
    largest whose total bytes fit the budget (total bytes grow monotonically with the scale). Every row keeps
    at least the smallest pool (rows are removed by eviction, not here); ties get equal widths.
    """
    n = imp.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    rb = row_bytes(pool_chunks, chunk_dim)
    s = np.power(np.maximum(imp.astype(np.float64), 0.0), power)
    top = float(s.max())
    if top <= 0 or rb[0] * n >= budget_bytes:
        return np.zeros(n, dtype=np.int64)
    if rb[-1] * n <= budget_bytes:
        return np.full(n, len(pool_chunks) - 1, dtype=np.int64)
    s = s / top
    hi = float(pool_chunks[-1]) / max(float(s[s > 0].min()), 1e-30)  # hi: every nonzero row full
    lo_l, hi_l = np.log(1e-12), np.log(hi)
    for _ in range(iters):
        mid = 0.5 * (lo_l + hi_l)
        if rb[pools_for(np.exp(mid), s, pool_chunks)].sum() <= budget_bytes:
            lo_l = mid
        else:
            hi_l = mid
    return pools_for(np.exp(lo_l), s, pool_chunks).astype(np.int64)
