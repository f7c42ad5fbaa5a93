"""Example streams built from a simulation's truth (the in-process quality benchmark's input), the online
logistic-regression baseline and the generator's-form reference learner of ``bench quality`` (no broker)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from benchmarks._form_fm import FormFM
from config import TrainerConfig
from streams.metrics import roc_auc
from streams.sources.generate import GeneratorConfig, simulate
from trainer.features import featurize
from benchmarks._online_lr import OnlineLR
from benchmarks._simulated import example_stream, truth_arrays

E_S = 600.0


@pytest.fixture(scope="module")
def sim():
    return simulate(GeneratorConfig(n_impressions=3000, seed=5, impressions_per_s=0.5, n_users=300, n_ads=60))


def test_elapsed_stream_matches_the_join_rules(sim):
    truth = truth_arrays(sim)
    n = len(truth["ts"])
    cd = sim.truth.column("click_delay_ms").to_numpy()
    vd = sim.truth.column("conversion_delay_ms").to_numpy()
    exs = example_stream(sim, "elapsed", elapsed_s=E_S)
    kinds = Counter(e.decided for e in exs)
    e_ms = E_S * 1000
    late_clicks = int(((truth["click"] > 0) & (cd > e_ms)).sum())
    late_convs = int(((truth["conversion"] > 0) & (vd > e_ms)).sum())
    assert late_convs > 0
    assert kinds == {"elapsed": n, "late_positive": late_clicks + late_convs}
    assert all(a.emitted_ts <= b.emitted_ts for a, b in zip(exs, exs[1:]))
    el = {e.example_id: e for e in exs if e.decided == "elapsed"}
    # labels at elapsed: only feedback that arrived by then; the rest comes as corrections, once each
    assert sum(e.conversion for e in el.values()) == int(truth["conversion"].sum()) - late_convs
    late = [e for e in exs if e.decided == "late_positive"]
    assert len({e.example_id for e in late}) == len(late)
    assert all(e.example_id.split("#")[0] in el for e in late)
    assert all(e.emitted_ts > e.impression.ts + e_ms for e in late)  # corrections come after the elapsed time
    naive = example_stream(sim, "naive", elapsed_s=E_S)
    assert [e.example_id for e in naive] == [e.example_id for e in exs if e.decided == "elapsed"]
    oracle = example_stream(sim, "oracle", elapsed_s=E_S)
    assert sum(e.conversion for e in oracle) == int(truth["conversion"].sum())
    with pytest.raises(ValueError, match="policy"):
        example_stream(sim, "later")


@pytest.mark.parametrize("kind", [OnlineLR, FormFM])
def test_online_baselines_learn_and_score_before_learning(sim, kind):
    tc = TrainerConfig(hash_buckets=2000, batch_size=100)
    exs = example_stream(sim, "oracle", elapsed_s=0)
    lr = kind(tc, lr=0.1)
    fb0 = featurize(exs[:100], tc)
    before = lr.score(fb0)
    p_click, _ = lr.train_step(fb0)
    np.testing.assert_allclose(p_click, before[0])  # the returned scores are pre-update
    assert not np.allclose(lr.score(fb0)[0], before[0])  # and the update happened
    scores, ys = [], []
    for i in range(100, len(exs), 100):
        fb = featurize(exs[i:i + 100], tc)
        pc, _ = lr.train_step(fb)
        if i >= len(exs) // 2:
            scores.append(pc), ys.append(fb.click)
    assert roc_auc(np.concatenate(ys), np.concatenate(scores)) > 0.6
