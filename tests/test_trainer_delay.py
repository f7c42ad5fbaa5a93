"""Delayed feedback: the delay histogram, ES-DFM weights (unbiased on simulated elapsed-time sampling), and
the weights the Learner applies per label decision (no broker)."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from streams import schema
from config import TrainerConfig
from trainer import checkpoint, delay
from trainer.features import featurize
from trainer.model import Learner

HOUR_MS = 3_600_000


def test_histogram_survival_matches_empirical():
    rng = np.random.default_rng(0)
    d = rng.exponential(2 * HOUR_MS, 50_000)
    h = delay.DelayHistogram()
    h.update(d)
    h.update(np.array([-1, -5]))  # absent delays are ignored
    assert h.total == 50_000
    for t in (60_000, HOUR_MS, 5 * HOUR_MS):
        assert abs(h.survival(t) - (d > t).mean()) < 0.01, t
    assert h.survival(10**12) == 0.0 and delay.DelayHistogram().survival(HOUR_MS) == 0.0
    assert abs(h.quantile(0.5) - np.median(d)) / np.median(d) < 0.08  # bins are 6% wide
    back = delay.DelayHistogram.from_state(h.state())
    assert back.survival(HOUR_MS) == h.survival(HOUR_MS)
    with pytest.raises(ValueError, match="decay"):
        delay.DelayHistogram(decay=0.0)


def test_histogram_decay_follows_a_shift():
    h = delay.DelayHistogram(decay=0.9)
    for _ in range(50):
        h.update(np.full(100, 60_000.0))  # fast conversions first
    for _ in range(50):
        h.update(np.full(100, 5 * HOUR_MS))  # then slow ones
    assert h.survival(HOUR_MS) > 0.99


@pytest.mark.parametrize("p,s", [(0.1, 0.9), (0.3, 0.6), (0.6, 0.2)])
def test_esdfm_weights_make_the_observed_stream_unbiased(p, s):
    """Elapsed-time sampling: each impression is observed at `elapsed` with y_obs = y * (delay <= e); delayed
    positives come again as duplicates. The weighted-BCE optimum of a constant predictor is
    sum(w*y)/sum(w); with ES-DFM weights it is the true rate p, without them p / (1 + p*s)."""
    rng = np.random.default_rng(1)
    n = 400_000
    y = rng.random(n) < p
    delayed = y & (rng.random(n) < s)
    obs = np.concatenate([y & ~delayed, np.ones(delayed.sum(), bool)]).astype(float)
    w1, w0 = delay.esdfm_weights(np.full(len(obs), p), s)
    w = np.where(obs > 0, w1, w0)
    tol = 4 * np.sqrt(p * (1 - p) / n)  # 4 standard errors
    assert abs((w * obs).sum() / w.sum() - p) < tol
    naive = obs.mean()
    assert abs(naive - p / (1 + p * s)) < tol and p - naive > 2 * tol


def test_objective_weights_by_decision():
    d = np.array([delay.ELAPSED, delay.ELAPSED, delay.LATE, delay.LATE, 0, 1])
    late = np.array([0, 0, 1, 2, 0, 0])
    click = np.array([1.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    conv = np.array([0.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    p = np.full(6, 0.4)
    wc, wv = delay.objective_weights(d, late, click, conv, p, p / 4, 0.5, 0.5)
    w1c, w0c = delay.esdfm_weights(0.4, 0.5)
    w1v, w0v = delay.esdfm_weights(0.1, 0.5)
    np.testing.assert_allclose(wc, [w1c, w0c, w1c, 0.0, 1.0, 1.0])  # a late conversion does not re-count its click
    np.testing.assert_allclose(wv, [w0v, w0v, 0.0, w1v, 1.0, 1.0])  # a late click is no conversion negative
    assert [delay.late_kind(x) for x in ("i1", "i1#late-click", "i1#late-conversion", "i#late-x")] == [0, 1, 2, 0]


def _examples(decided: str) -> list[schema.Example]:
    t0 = 1_700_000_000_000
    out = []
    for i in range(64):
        imp = schema.Impression(event_id=f"i{i}", ts=t0 + i, user_id=i, ad_id=i % 7, campaign_id=1,
                                advertiser_id=1, domain=schema.DOMAINS[i % 5])
        conv = i % 4 == 0
        out.append(schema.Example(example_id=f"i{i}" + ("#late-conversion" if decided == "late_positive" else ""),
                                  impression=imp, click=int(conv or i % 3 == 0), conversion=int(conv),
                                  click_ts=t0 + i + 5_000 if conv or i % 3 == 0 else None,
                                  conversion_ts=t0 + i + 2 * HOUR_MS if conv else None, decided=decided))
    return out


def test_learner_weights_elapsed_examples_and_checkpoints_the_histograms(tmp_path):
    tc = TrainerConfig(hash_buckets=1000, device="cpu", backend="torch")
    learner = Learner(tc, elapsed_s=3600)
    # final labels: weights stay the examples' own, but the delays are learned (conversions take 2 h)
    fb = featurize(_examples("window_closed"), tc)
    wc, wv = learner.loss_weights(fb, np.full(64, 0.3), np.full(64, 0.1))
    assert wv is None and np.array_equal(wc, fb.weight)
    assert learner.delays["conversion"].survival(HOUR_MS) == 1.0 and learner.delays["click"].survival(HOUR_MS) == 0
    fb = featurize(_examples("elapsed"), tc)
    wc, wv = learner.loss_weights(fb, np.full(64, 0.3), np.full(64, 0.1))
    np.testing.assert_allclose(wc, 1.0, rtol=1e-6)  # clicks come within minutes: nothing to correct
    w1, w0 = delay.esdfm_weights(0.1, 1.0)
    np.testing.assert_allclose(wv, np.where(fb.conversion > 0, w1, w0), rtol=1e-6)
    learner.train_step(fb)
    b = Learner(msgspec.structs.replace(tc, seed=5))
    b.load_state(checkpoint.load(checkpoint.save(tmp_path, {"learner": learner.state()}, seq=1))["learner"])
    assert b.delays["conversion"].state() == learner.delays["conversion"].state()
    naive = Learner(tc, delay_weighting=False)
    wc, wv = naive.loss_weights(fb, np.full(64, 0.3), np.full(64, 0.1))
    assert wv is None
