"""Pure metrics of scored labels, one definition for every place that computes them: the generator's oracle,
the benchmarks, the tests that check the dashboards' SQL (against scikit-learn as well), the trainer's reports.

>>> y, p = np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])
>>> roc_auc(y, p), round(normalized_entropy(y, p), 4)
(0.75, 0.6814)
"""

from __future__ import annotations

import numpy as np


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney, ties averaged); NaN when ``y`` has one class.

    >>> roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    0.75
    """
    y = np.asarray(y).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inv, cnt = np.unique(np.asarray(p, dtype=np.float64), return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(cnt) - (cnt - 1) / 2.0  # 1-based average rank of each distinct score
    rank_sum = avg_rank[inv][y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def normalized_entropy(y: np.ndarray, p: np.ndarray, eps: float = 1e-12) -> float:
    """Mean log loss divided by the entropy of the base rate (lower is better; 1.0 = predicting the mean);
    NaN when ``y`` has one class (the base rate's entropy is 0)."""
    y = np.asarray(y, dtype=np.float64)
    if not len(y) or y.min() == y.max():
        return float("nan")
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    base = float(np.clip(y.mean(), eps, 1 - eps)) if len(y) else 0.5
    ll = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)) if len(y) else float("nan")
    return float(ll / -(base * np.log(base) + (1 - base) * np.log(1 - base)))
