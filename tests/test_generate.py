"""Synthetic traffic: determinism, ordering, feedback rules, ground truth, learnable signal, bad records."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from deploy.cli import main
from streams import schema
from streams.metrics import roc_auc
from streams.sources.generate import GeneratorConfig, oracle_metrics, simulate
from streams.sources.logfile import BadRecord, count_lines, iter_jsonl, write_jsonl

N = 20_000


@pytest.fixture(scope="module")
def sim():
    return simulate(GeneratorConfig(n_impressions=N, seed=7))


def _good(records):
    return [r for r in records if not isinstance(r, BadRecord)]


def test_deterministic_for_a_seed(sim):
    again = simulate(GeneratorConfig(n_impressions=N, seed=7))
    assert [schema.encode(r) for r in again.records] == [schema.encode(r) for r in sim.records]
    assert again.truth.equals(sim.truth)
    other = simulate(GeneratorConfig(n_impressions=N, seed=8))
    assert other.truth.column("p_click") != sim.truth.column("p_click")
    assert other.records[0].event_id == "imp-8-0"


def test_time_ordered_and_unique_ids(sim):
    ts = [r.ts for r in sim.records]
    assert all(a <= b for a, b in zip(ts, ts[1:]))
    ids = [r.event_id for r in sim.records]
    assert len(set(ids)) == len(ids)
    assert sim.counts()["impression"] == N
    span_s = (max(r.ts for r in sim.records if isinstance(r, schema.Impression)) - sim.config.start_ts) / 1000
    assert 0.8 * N / 50 < span_s < 1.2 * N / 50  # ~50 impressions/s of event time


def test_feedback_follows_impressions_within_caps(sim):
    g = sim.config
    imps = {r.event_id: r for r in sim.records if isinstance(r, schema.Impression)}
    clicks = {r.impression_id: r for r in sim.records if isinstance(r, schema.Click)}
    convs = [r for r in sim.records if isinstance(r, schema.Conversion)]
    assert len(clicks) == sim.counts()["click"] > 100  # at most one click per impression
    for c in clicks.values():
        imp = imps[c.impression_id]
        assert c.user_id == imp.user_id
        assert 0 < c.ts - imp.ts <= g.max_click_delay_s * 1000
    assert convs
    for v in convs:
        imp, clk = imps[v.impression_id], clicks[v.impression_id]  # KeyError = conversion without click
        assert v.user_id == imp.user_id
        assert clk.ts < v.ts <= imp.ts + g.max_conversion_delay_s * 1000
    cvr = len(convs) / len(clicks)
    assert 0.03 < cvr < 0.25


def test_truth_matches_records(sim):
    t = sim.truth.to_pydict()
    assert t["impression_id"] == [f"imp-7-{i}" for i in range(N)]
    imps = {r.event_id: r for r in sim.records if isinstance(r, schema.Impression)}
    clicks = {r.impression_id: r.ts for r in sim.records if isinstance(r, schema.Click)}
    convs = {r.impression_id: r.ts for r in sim.records if isinstance(r, schema.Conversion)}
    for i, iid in enumerate(t["impression_id"]):
        imp = imps[iid]
        assert (t["domain"][i], t["user_id"][i], t["ts"][i]) == (imp.domain, imp.user_id, imp.ts)
        assert t["click"][i] == (iid in clicks) and t["conversion"][i] == (iid in convs)
        assert t["click_delay_ms"][i] == (clicks[iid] - imp.ts if iid in clicks else -1)
        assert t["conversion_delay_ms"][i] == (convs[iid] - imp.ts if iid in convs else -1)
        assert 0 < t["p_click"][i] < 1 and 0 < t["p_cvr"][i] < 1


def test_signal_is_learnable_and_domains_differ(sim):
    t = sim.truth.to_pandas()
    assert roc_auc_score(t.click, t.p_click) > 0.7
    ctr = {}
    for d, part in t.groupby("domain"):
        assert roc_auc_score(part.click, part.p_click) > 0.65, d
        ctr[d] = part.click.mean()
    assert set(ctr) == {"feed", "stories", "video", "search"}
    assert ctr["search"] > 2 * ctr["video"]  # base rates differ by domain
    assert 0.005 < t.click.mean() < 0.08
    m = oracle_metrics(sim.truth)
    assert m["all"]["auc_click"] == pytest.approx(roc_auc_score(t.click, t.p_click), abs=1e-12)
    assert m["feed"]["ne_click"] < 1.0  # the true model beats predicting the base rate


def test_roc_auc_handles_ties_like_sklearn():
    rng = np.random.default_rng(0)
    y = rng.random(500) < 0.3
    p = np.round(rng.random(500), 1)  # many ties
    assert roc_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert np.isnan(roc_auc(np.zeros(3), np.ones(3)))


def test_bad_records_are_extra_and_all_invalid():
    clean = simulate(GeneratorConfig(n_impressions=3000, seed=2))
    dirty = simulate(GeneratorConfig(n_impressions=3000, seed=2, bad_rate=0.05))
    bad = [r for r in dirty.records if isinstance(r, BadRecord)]
    assert _good(dirty.records) == clean.records  # bad records never replace good ones
    assert len(bad) == round(0.05 * len(clean.records))
    assert len({b.kind for b in bad}) >= 12
    assert {b.topic_kind for b in bad} == {"impression", "click", "conversion"}
    for b in bad:
        assert isinstance(schema.decode(b.raw), schema.Invalid), b.kind
        assert b"\n" not in b.raw and b"\r" not in b.raw
    assert any(len(b.raw) > 100_000 for b in bad)  # huge string


def test_jsonl_round_trip(tmp_path):
    s = simulate(GeneratorConfig(n_impressions=1000, seed=3, bad_rate=0.05))
    path = tmp_path / "log.jsonl"
    assert write_jsonl(path, s.records) == len(s.records) == count_lines(path)
    lines = list(iter_jsonl(path))
    assert [n for n, _ in lines] == list(range(1, len(s.records) + 1))
    for (_, raw), rec in zip(lines, s.records):
        got = schema.decode(raw)
        if isinstance(rec, BadRecord):
            assert isinstance(got, schema.Invalid)
        else:
            assert got == rec


def test_validation_names_the_field():
    with pytest.raises(ValueError, match="domains.*fed"):
        simulate(GeneratorConfig(n_impressions=10, domains=("feed", "fed")))
    with pytest.raises(ValueError, match="max_conversion_delay_s"):
        simulate(GeneratorConfig(n_impressions=10, max_conversion_delay_s=10.0))


def test_cli_writes_log_and_truth(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("STREAMREC_KAFKA__BOOTSTRAP_SERVERS", raising=False)
    out, truth = tmp_path / "g.jsonl", tmp_path / "t.parquet"
    rc = main(["generate", "--events", "800", "--seed", "4", "--bad-rate", "0.02", "--domains", "feed,search",
               "--out", str(out), "--truth", str(truth), "--no-progress"])
    assert rc == 0
    t = pq.read_table(truth)
    assert t.num_rows == 800 and set(t.column("domain").to_pylist()) == {"feed", "search"}
    assert count_lines(out) == 800 + sum(t.column("click").to_pylist()) + sum(t.column("conversion").to_pylist()) \
        + round(0.02 * (800 + sum(t.column("click").to_pylist()) + sum(t.column("conversion").to_pylist())))
    assert "oracle AUC" in capsys.readouterr().out
    assert main(["generate", "--events", "10", "--no-progress"]) == 2
    assert "no broker configured" in capsys.readouterr().err
    assert main(["generate", "--events", "10", "--domains", "feed,nope", "--out", str(out)]) == 2


# -- drift scenarios, ad lifecycle, calibrated delays, per-window oracle -----------------------------------

from streams.sources import scenarios  # noqa: E402
from streams.sources.generate import oracle_by_window  # noqa: E402


def _windows(sc: str, n: int = 40_000, **params):
    g = GeneratorConfig(n_impressions=n, seed=5, scenario=scenarios.ScenarioConfig(name=sc, **params))
    sim = simulate(g)
    span_s = (sim.truth.column("ts").to_numpy().max() - g.start_ts) / 1000
    return sim, oracle_by_window(sim.truth, span_s / 4 + 1)


def test_sudden_drift_hurts_only_the_stale_oracle():
    _, none = _windows("none")
    _, sudden = _windows("sudden", at=0.5)
    assert len(none) == len(sudden) == 4
    for w in (none, sudden):
        assert sum(r["impressions"] for r in w) == 40_000
        assert all(r["auc_click"] > 0.75 for r in w)  # the current truth stays as learnable
    assert all(abs(r["auc_click"] - r["auc_click_t0"]) < 0.03 for r in none)
    assert all(abs(r["auc_click"] - r["auc_click_t0"]) < 0.02 for r in sudden[:2])  # before the shift
    assert all(r["auc_click"] - r["auc_click_t0"] > 0.06 for r in sudden[2:])  # after it
    assert all(r["ne_click_t0"] > r["ne_click"] + 0.05 for r in sudden[2:])


def test_gradual_drift_grows_and_seasonal_moves_the_ctr():
    _, grad = _windows("gradual")
    gaps = [r["auc_click"] - r["auc_click_t0"] for r in grad]
    assert gaps[0] < 0.02 < gaps[1] < gaps[3] and gaps[3] > 0.05
    sim, _ = _windows("seasonal", amplitude=1.0, period_s=400.0)
    t = sim.truth.to_pandas()
    phase = np.sin(2 * np.pi * (t.ts - sim.config.start_ts) / 1000 / 400.0)
    high, low = t.click[phase > 0.5].mean(), t.click[phase < -0.5].mean()
    assert high > 1.8 * low


def test_new_ad_surge_takes_its_share_after_birth():
    sim, w = _windows("new-ad-surge", at=0.5, surge_share=0.5)
    t = sim.truth.to_pandas()
    new = t.ad_id > sim.config.n_ads
    late = np.arange(len(t)) >= len(t) * 0.55
    assert not new[np.arange(len(t)) < len(t) * 0.45].any()
    assert 0.45 < new[late].mean() < 0.55
    assert w[3]["auc_click"] - w[3]["auc_click_t0"] > 0.02  # the stale oracle does not know them


def test_ads_are_born_and_retired():
    rng = np.random.default_rng(0)
    sc = scenarios.ScenarioConfig()
    birth, death = scenarios.ad_lifetimes(1000, 0, 0.3, sc, rng)
    assert (birth > 0).sum() == 300 and np.isfinite(death).sum() == 300 and (death > birth).all()
    t = np.sort(rng.random(50_000))
    ad = scenarios.sample_ads(t, np.full(1000, 1e-3), birth, death, 0, 0.0, rng)
    bucket_start = np.floor(t * 64) / 64
    assert (birth[ad] <= bucket_start).all() and (death[ad] > bucket_start).all()
    assert len(np.unique(ad[t < 0.1])) < len(np.unique(ad))  # ads appear over time


def test_calibrated_delays_match_published_shares_and_cap():
    d = scenarios.conversion_delays_s("calibrated", 100_000, np.random.default_rng(1), scenarios.MAX_DELAY_S)
    assert abs((d <= 3600).mean() - 0.35) < 0.01 and abs((d <= 86400).mean() - 0.50) < 0.01
    assert d.max() <= scenarios.MAX_DELAY_S and (d > 7 * 86400).mean() > 0.15  # long tail
    capped = scenarios.conversion_delays_s("calibrated", 10_000, np.random.default_rng(1), 7 * 86400)
    assert capped.max() <= 7 * 86400 and (capped <= 86400).mean() > 0.55
    g = GeneratorConfig(n_impressions=20_000, seed=3, delays="calibrated", max_conversion_delay_s=30 * 86400)
    t = simulate(g).truth.to_pandas()
    conv = t[t.conversion == 1]
    assert len(conv) > 30 and conv.conversion_delay_ms.max() <= 30 * 86400 * 1000
    assert (conv.conversion_delay_ms > 86400 * 1000).mean() > 0.25  # past the default 24 h window
    with pytest.raises(ValueError, match="max_conversion_delay_s"):
        simulate(GeneratorConfig(n_impressions=10, max_conversion_delay_s=31 * 86400))


def test_cli_scenario_and_delays(tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    assert main(["generate", "--events", "3000", "--scenario", "sudden", "--scenario-param", "at=0.3",
                 "--delays", "calibrated", "--oracle-window", "10s", "--out", str(out)]) == 0
    text = capsys.readouterr()
    assert "oracle by 10 s window" in text.out and "stale (t0)" in text.out
    assert "reach past the label windows" in text.err  # 30-day tail vs the 24 h conversion window
    assert main(["generate", "--events", "10", "--scenario-param", "nope=1", "--out", str(out)]) == 2
    assert main(["generate", "--events", "10", "--max-conversion-delay", "40d", "--out", str(out)]) == 2


def test_interest_shift_moves_users_one_at_a_time():
    sim, w = _windows("interest-shift")
    none, _ = _windows("none")
    a, b = sim.truth.to_pandas(), none.truth.to_pandas()
    assert (a.user_id == b.user_id).all() and (a.ad_id == b.ad_id).all()  # the same world, only tastes move
    gaps = [r["auc_click"] - r["auc_click_t0"] for r in w]
    assert gaps[0] < 0.01 and gaps[0] < gaps[1] < gaps[3] and gaps[3] > 0.04  # more users switched by then
    assert all(r["auc_click"] > 0.75 for r in w)


@pytest.mark.parametrize("scenario", ["none", "sudden", "interest-shift"])
def test_hidden_tastes_are_the_ones_the_clicks_were_drawn_from(scenario):
    from streams.sources.generate import TruthParams, hidden_tastes

    # every other term of the click logit switched off: logit(p_click) - logit(base) is exactly <user, ad>
    truth = TruthParams(user_bias_std=0, ad_bias_std=0, position_effect=0, dense_weight_std=0, cat_effect_std=0)
    sim = simulate(GeneratorConfig(n_impressions=3000, seed=9, n_users=50, n_ads=30, truth=truth, ad_churn=0,
                                   scenario=scenarios.ScenarioConfig(name=scenario)))
    u, a = hidden_tastes(sim)
    p = sim.truth.column("p_click").to_numpy()
    base = np.array([truth.base_ctr[d] for d in sim.truth.column("domain").to_pylist()])
    np.testing.assert_allclose(np.log(p / (1 - p)) - np.log(base / (1 - base)), np.einsum("nk,nk->n", u, a),
                               atol=1e-9)
    users = sim.truth.column("user_id").to_numpy()
    tastes = [len(np.unique(u[users == x], axis=0)) for x in np.unique(users)]
    if scenario == "interest-shift":  # a user's taste changes once, at their own switch
        assert max(tastes) == 2 and tastes.count(2) > len(tastes) // 2
    else:
        assert max(tastes) == 1
