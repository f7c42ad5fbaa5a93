"""An online logistic-regression baseline on the trainer's own hashed features (numpy, per-coordinate Adagrad).

The honest "simple model" of the quality comparisons (``river`` is not installed): one weight per hashed
sparse row of every table, one per dense value and one bias per domain, for each objective separately
(click over impressions, conversion over impressions: the same CTCVR target as the MDMO model's conversion
head). Same :class:`~trainer.features.FeatureBatch` input, same score-then-learn protocol.

>>> from config import TrainerConfig
>>> lr = OnlineLR(TrainerConfig(hash_buckets=10))
>>> lr.w.shape   # (objectives, tables * rows + dense + domains)
(2, 133)
"""

from __future__ import annotations

import numpy as np

from streams import schema
from config import TrainerConfig
from trainer.features import FeatureBatch, table_names


class OnlineLR:
    """``train_step(fb) -> (p_click (B,), p_conversion (B,))`` scored before the update; ``score(fb)``."""

    def __init__(self, tcfg: TrainerConfig, lr: float = 0.05, eps: float = 1e-6):
        self.t, self.r, self.dd = len(table_names(tcfg)), tcfg.hash_buckets, tcfg.dense_dim
        self.n = self.t * self.r + self.dd + len(schema.DOMAINS)
        self.w = np.zeros((2, self.n))
        self.g2 = np.zeros((2, self.n))
        self.lr, self.eps = lr, eps

    def _coords(self, fb: FeatureBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(example (K,), coordinate (K,), value (K,)) of every non-zero input."""
        b = fb.batch_size
        lengths = np.diff(fb.offsets)
        bag = np.repeat(np.arange(self.t * b), lengths)
        ex_sparse, col_sparse = bag % b, (bag // b) * self.r + fb.indices
        ex_dense = np.repeat(np.arange(b), self.dd)
        col_dense = np.tile(np.arange(self.dd), b) + self.t * self.r
        ex = np.concatenate([ex_sparse, ex_dense, np.arange(b)])
        col = np.concatenate([col_sparse, col_dense, self.t * self.r + self.dd + fb.domain])
        val = np.concatenate([np.ones(len(ex_sparse)), fb.dense.ravel().astype(np.float64), np.ones(b)])
        return ex, col, val

    def _predict(self, ex, col, val, b) -> np.ndarray:
        logits = np.stack([np.bincount(ex, weights=self.w[k, col] * val, minlength=b) for k in range(2)])
        return 1.0 / (1.0 + np.exp(-np.clip(logits, -30, 30)))

    def score(self, fb: FeatureBatch) -> tuple[np.ndarray, np.ndarray]:
        p = self._predict(*self._coords(fb), fb.batch_size)
        return p[0], p[1]

    def train_step(self, fb: FeatureBatch) -> tuple[np.ndarray, np.ndarray]:
        ex, col, val = self._coords(fb)
        p = self._predict(ex, col, val, fb.batch_size)
        for k, y in enumerate((fb.click, fb.conversion)):
            err = (p[k] - y) * fb.weight  # d logloss / d logit per example
            ucol, inv = np.unique(col, return_inverse=True)
            g = np.bincount(inv, weights=err[ex] * val, minlength=len(ucol))
            self.g2[k, ucol] += g * g
            self.w[k, ucol] -= self.lr * g / (np.sqrt(self.g2[k, ucol]) + self.eps)
        return p[0], p[1]
