"""Synthetic traffic: determinism, ordering, feedback rules, ground truth, learnable signal, bad records."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from deploy.cli import main
from streams import schema
from streams.generate import GeneratorConfig, oracle_metrics, roc_auc, simulate
from streams.logfile import BadRecord, count_lines, iter_jsonl, write_jsonl

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
