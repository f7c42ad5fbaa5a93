"""The project's pure metrics against scikit-learn on random scores (with ties and extreme probabilities)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from streams.metrics import normalized_entropy, roc_auc


@pytest.mark.parametrize("seed", range(5))
def test_auc_and_ne_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 5000))
    y = (rng.random(n) < rng.uniform(0.01, 0.5)).astype(int)
    y[:2] = [0, 1]
    p = np.round(rng.beta(1, 5, n), int(rng.integers(1, 4)))  # coarse rounding: many ties
    p = np.clip(p, 1e-6, 1 - 1e-6)
    base = y.mean()
    assert roc_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    want = log_loss(y, p) / -(base * math.log(base) + (1 - base) * math.log(1 - base))
    assert normalized_entropy(y, p) == pytest.approx(want, rel=1e-9)


def test_one_class_gives_nan():
    assert math.isnan(roc_auc(np.zeros(5), np.linspace(0, 1, 5)))
    assert math.isnan(normalized_entropy(np.ones(5), np.linspace(0.1, 0.9, 5)))
