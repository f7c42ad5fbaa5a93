"""The hot-path SQL against numpy / scikit-learn on the same rows: bucketed AUC, NE and calibration from the
prediction rollup, PSI for prediction and feature drift (against a shifted window and against the older half
of the window's data), pipeline latency and log age; idempotence of the rollup and of feature statistics under
repeated writes; the alert rules on drifted data. (The stats flow's records through the sink into the drift and
label-delay SQL: tests/test_stats_flow.py.)"""

from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from dashboards import alerts
from dashboards import queries as q
from dashboards.feature_stats import feature_stats_rows, feature_stats_topic
from dashboards.sink import prediction_rows
from streams import schema
from streams.metrics import normalized_entropy
from config import load_config

DOMAINS = ("feed", "video")


def batches(rng, now_ms, minutes=(1, 2, 3), n=2000, shift=0.0, prefix="e"):
    """One batch per entry of ``minutes`` (trained that many minutes ago); ``shift`` raises video's scores."""
    out = []
    for b, m in enumerate(minutes):
        click = rng.random(n) < 0.2
        dom = np.array([DOMAINS[i] for i in rng.integers(0, 2, n)])
        p = 1 / (1 + np.exp(-(-1.6 + 1.2 * click + rng.normal(0, 0.8, n) + shift * (dom == "video"))))
        event = now_ms - m * 60_000 - rng.integers(1_000, 8 * 3600_000, n)
        emitted = event + rng.choice([10_000, 120_000, 1_800_000, 7_200_000, 100_000_000], n)
        out.append(schema.PredictionBatch(
            model_version=b, trained_ts=now_ms - m * 60_000 + 5_000, example_ids=[f"{prefix}{b}_{i}" for i in range(n)],
            domains=dom.tolist(), event_ts=event.tolist(), emitted_ts=emitted.tolist(), p_click=p.tolist(),
            p_conversion=(p / 5).tolist(), click=click.astype(int).tolist(),
            conversion=(click & (rng.random(n) < 0.3)).astype(int).tolist()))
    return out


def _cols(bs, objective):
    dom = np.concatenate([b.domains for b in bs])
    p = np.concatenate([getattr(b, "p_" + objective) for b in bs]).astype(np.float32).astype(np.float64)
    y = np.concatenate([getattr(b, objective) for b in bs])
    return dom, p, y


def _psi(cur, ref, floor=q.PSI_FLOOR):
    keys = sorted(set(cur) | set(ref))
    c = np.array([cur.get(k, 0) for k in keys], float)
    r = np.array([ref.get(k, 0) for k in keys], float)
    c, r = np.maximum(c / c.sum(), floor), np.maximum(r / r.sum(), floor)
    return float(np.sum((c - r) * np.log(c / r)))


def _score_bins(p):
    p = np.clip(p, 1e-7, 1 - 1e-7)
    b = np.round((np.clip(np.log(p / (1 - p)), -q.LOGIT_CLAMP, q.LOGIT_CLAMP) + q.LOGIT_CLAMP) * q.BUCKETS_PER_LOGIT)
    return (b // q.BUCKETS_PER_LOGIT).astype(int)


def test_rollup_metrics_match_sklearn_and_survive_redelivery(store):
    now = int(time.time() * 1000)
    bs = batches(np.random.default_rng(0), now)
    store.insert("predictions", prediction_rows(bs, now))
    store.refresh_rollup(now - 10 * 60_000, now)
    store.insert("predictions", prediction_rows(bs[:2], now + 1))  # at-least-once: the same batches again
    store.refresh_rollup(now - 10 * 60_000, now)
    store.refresh_rollup(now - 10 * 60_000, now)  # and a repeated refresh
    got = {(r["domain_"], r["objective_"]): r for r in
           store.query(q.render(q.ROLLUP_QUALITY, "live"), q.live_parameters(10)).records()}
    for objective in ("click", "conversion"):
        dom, p, y = _cols(bs, objective)
        for d in DOMAINS:
            m = dom == d
            row = got[(d, objective)]
            assert (row["examples"], row["labelled_positives"]) == (m.sum(), y[m].sum())
            assert row["auc"] == pytest.approx(roc_auc_score(y[m], p[m]), abs=2e-3), (d, objective)
            ne = normalized_entropy(y[m], p[m])
            assert row["ne"] == pytest.approx(ne, rel=1e-6)
            assert row["calibration"] == pytest.approx(p[m].sum() / y[m].sum(), rel=1e-6)
    # the per-bucket series pools the same rows: the minute buckets of click AUC for feed
    params = {**q.live_parameters(10), "bucket_s": 60}
    series = store.query(q.render(q.rollup_by_domain(q.R_AUC, "click"), "live"), params).rows
    assert len({t for t, s, _ in series if s == "feed"}) == 3


def test_prediction_drift_psi_matches_numpy(store):
    now = int(time.time() * 1000)
    rng = np.random.default_rng(1)
    ref = batches(rng, now, minutes=(7, 8), prefix="r")
    cur = batches(rng, now, minutes=(1, 2), shift=1.5, prefix="c")
    store.insert("predictions", prediction_rows(ref + cur, now))
    store.refresh_rollup(now - 20 * 60_000, now)
    params = q.live_parameters(5, ref_minutes=6)  # window [-5, 0] min against [-11, -6] min
    got = {(r["domain"], r["objective"]): r for r in store.query(q.render(q.PREDICTION_DRIFT, "live"), params).records()}
    for d in DOMAINS:
        dc, pc, _ = _cols(cur, "click")
        dr, pr, _ = _cols(ref, "click")
        hist = lambda p: dict(zip(*np.unique(_score_bins(p), return_counts=True)))  # noqa: E731
        want = _psi(hist(pc[dc == d]), hist(pr[dr == d]))
        assert got[(d, "click")]["psi"] == pytest.approx(want, rel=1e-9, abs=1e-12), d
    assert got[("video", "click")]["psi"] > 0.25 > got[("feed", "click")]["psi"]


def _feature_record(emitted, domain, counts, partition=0):
    start = emitted - 60_000
    return schema.FeatureStats(stats_id=f"{start}:{domain}:dense.0:p{partition}", window_start=start,
                               window_end=emitted, domain=domain, feature="dense.0", kind="histogram",
                               partition=partition, instance=f"p{partition}", count=int(sum(counts)),
                               emitted_ts=emitted, mean=0.0, std=1.0, min=-1.0, max=1.0,
                               bins=[str(k) for k in range(len(counts))], counts=[int(c) for c in counts])


def test_feature_drift_psi_matches_numpy_and_is_idempotent(store):
    now = int(time.time() * 1000)
    rng = np.random.default_rng(2)
    ref_counts = [rng.multinomial(1000, [0.1, 0.2, 0.4, 0.2, 0.1]).tolist() for _ in range(3)]
    cur_counts = [rng.multinomial(1000, [0.05, 0.1, 0.3, 0.3, 0.25]).tolist() for _ in range(2)]
    recs = [_feature_record(now - (8 + i) * 60_000, "feed", c) for i, c in enumerate(ref_counts)]
    recs += [_feature_record(now - (1 + i) * 60_000, "feed", c) for i, c in enumerate(cur_counts)]
    assert [schema.check(r) for r in recs] == [None] * 5
    store.insert("feature_stats", feature_stats_rows(recs, now))
    store.insert("feature_stats", feature_stats_rows(recs[-2:], now + 1))  # re-delivered
    sum_counts = lambda cs: {str(k): v for k, v in enumerate(np.sum(cs, axis=0))}  # noqa: E731
    want = _psi(sum_counts(cur_counts), sum_counts(ref_counts))
    for params in (q.live_parameters(5, ref_minutes=6),  # [-5, 0] min against [-11, -6] min
                   q.live_parameters(12)):  # the older half of [-12, 0] min's data (emitted -10..-8) against the newer
        res = store.query(q.render(q.FEATURE_DRIFT, "live"), params).records()
        assert len(res) == 1 and res[0]["n"] == 2000 and res[0]["ref_n"] == 3000, params
        assert res[0]["psi"] == pytest.approx(want, rel=1e-9)


def test_prediction_drift_against_the_older_half_of_a_short_run(store):
    # a two-minute run: everything the store holds is inside the window, nothing before it; the reference is
    # the first minute's scores, the current part the second minute's
    now = int(time.time() * 1000)
    rng = np.random.default_rng(5)
    ref = batches(rng, now, minutes=(2,), prefix="r")
    cur = batches(rng, now, minutes=(1,), shift=1.5, prefix="c")
    store.insert("predictions", prediction_rows(ref + cur, now))
    assert store.query(q.render(q.PREDICTION_DRIFT, "live"), q.live_parameters(60, ref_minutes=60)).rows == []
    got = {(r["domain"], r["objective"]): r for r in
           store.query(q.render(q.PREDICTION_DRIFT, "live"), q.live_parameters(60)).records()}
    hist = lambda p: dict(zip(*np.unique(_score_bins(p), return_counts=True)))  # noqa: E731
    for d in DOMAINS:
        (dc, pc, _), (dr, pr, _) = _cols(cur, "click"), _cols(ref, "click")
        row = got[(d, "click")]
        assert (row["n"], row["ref_n"]) == ((dc == d).sum(), (dr == d).sum())
        assert row["psi"] == pytest.approx(_psi(hist(pc[dc == d]), hist(pr[dr == d])), rel=1e-9, abs=1e-12)
        t_ref = ref[0].trained_ts / 1000  # the reference is the first batch, trained a minute before the second
        assert (row["ref_from"].timestamp(), row["ref_s"]) == (t_ref, 0.0)
    assert got[("video", "click")]["psi"] > 0.25 > got[("feed", "click")]["psi"]
    series = store.query(q.render(q.prediction_drift_series(), "live"), q.live_parameters(60)).rows
    assert {s for _, s, _ in series} == set(DOMAINS) and len({t for t, _, _ in series}) == 1  # the newer half


def test_pipeline_latency_and_log_age_measure_different_things(store):
    # a replay of a 3 h old log, labelled 2 s before it was trained: the pipeline is fresh, the log is old
    now = int(time.time() * 1000)
    n, trained = 300, now - 30_000
    batch = schema.PredictionBatch(
        model_version=1, trained_ts=trained, example_ids=[f"x{i}" for i in range(n)], domains=["feed"] * n,
        event_ts=[trained - 3 * 3600_000 - 1000 * (i % 3) for i in range(n)], emitted_ts=[trained - 2_000] * n,
        p_click=[0.1] * n, p_conversion=[0.01] * n, click=[i % 5 == 0 for i in range(n)], conversion=[0] * n)
    store.insert("predictions", prediction_rows([batch], now))
    params = q.live_parameters(10)
    series = {s: v for _, s, v in store.query(q.render(q.PIPELINE_LATENCY, "live"), params).rows}
    assert series["labelled to trained p50"] == pytest.approx(2.0) == series["labelled to trained p99"]
    assert series["labelled to stored p50"] == pytest.approx(32.0, abs=0.01)  # stored at `now`
    (p50,), = store.query(q.render(q.PIPELINE_LATENCY_P50, "live"), params).rows
    assert p50 == pytest.approx(32.0, abs=0.01)
    age = {s: v for _, s, v in store.query(q.render(q.LOG_AGE, "live"), params).rows}
    assert age["event to trained p50"] == pytest.approx(3 * 3600 + 1, abs=0.01)
    (log_age,), = store.query(q.render(q.LOG_AGE_NOW, "live"), params).rows
    assert 3 * 3600 + 30 <= log_age < 3 * 3600 + 30 + 60  # newest event to the query's now


def test_alert_rules_fire_on_drift_only(store):
    now = int(time.time() * 1000)
    rng = np.random.default_rng(4)
    store.insert("predictions", prediction_rows(
        batches(rng, now, minutes=(12, 14, 16), prefix="r") + batches(rng, now, minutes=(2, 4, 6), shift=2.0,
                                                                         prefix="c"), now))
    store.refresh_rollup(now - 30 * 60_000, now)
    states = alerts.evaluate(store)
    assert not [s for s in states if s.get("error")], states
    firing = {(s["rule"], s["series"]) for s in states if s["firing"]}
    assert ("prediction_drift", "video") in firing and ("prediction_drift", "feed") not in firing
    assert ("quality_drop", "feed") not in firing
    assert {s["series"] for s in alerts.evaluate(store, "feed") if s["rule"] == "prediction_drift"} == {"feed"}


def test_training_lag_alert_follows_the_trainer_not_the_event_age(store):
    # feed: 3 h old events (a replay, or the label window) labelled and trained within seconds: healthy;
    # video: labelled 20 min before it was trained: the trainer is behind
    now = int(time.time() * 1000)
    n = 200

    def batch(domain, lag_ms, prefix):
        trained = now - 60_000
        return schema.PredictionBatch(
            model_version=1, trained_ts=trained, example_ids=[f"{prefix}{i}" for i in range(n)], domains=[domain] * n,
            event_ts=[trained - 3 * 3600_000] * n, emitted_ts=[trained - lag_ms] * n, p_click=[0.1] * n,
            p_conversion=[0.01] * n, click=[i % 5 == 0 for i in range(n)], conversion=[0] * n)

    store.insert("predictions", prediction_rows([batch("feed", 2_000, "f"), batch("video", 20 * 60_000, "v")], now))
    lag = {s["series"]: s for s in alerts.evaluate(store) if s["rule"] == "freshness_lag"}
    assert lag["feed"]["value"] == pytest.approx(2.0) and not lag["feed"]["firing"]
    assert lag["video"]["value"] == pytest.approx(1200.0) and lag["video"]["firing"]


def test_silent_components_and_crash_loops_fire_and_the_health_panel_shows_them(store):
    from dashboards.sink import stats_rows

    now = int(time.time() * 1000)
    store.insert("service_stats", stats_rows([
        schema.ServiceStats("trainer", now - 2_000, {"examples_per_s": 900.0}, "pid1"),
        schema.ServiceStats("labels", now - 95_000, {"events_per_s": 0.0}, "host-1"),  # silent for 95 s
        schema.ServiceStats("replay", now - 300_000, {"events_per_s": 0.0}),  # finite: its silence is normal
        schema.ServiceStats("supervisor", now - 40_000, {"up.labels": 0.0, "restarts.labels": 3.0,
                                                         "crash_looping.labels": 1.0}),
        schema.ServiceStats("supervisor", now - 1_000, {"up.labels": 1.0, "restarts.labels": 4.0,
                                                        "crash_looping.labels": 1.0, "up.trainer": 1.0,
                                                        "restarts.trainer": 0.0, "crash_looping.trainer": 0.0})]))
    firing = {(s["rule"], s["series"]) for s in alerts.evaluate(store) if s["firing"]}
    assert {r for r in firing if r[0] in ("component_silent", "crash_loop")} == {
        ("component_silent", "labels"), ("crash_loop", "labels")}
    rows = store.query(q.render(q.STACK_HEALTH, "live"), q.live_parameters(10)).rows
    late = int(time.time() - now / 1000) + 1  # seconds since `now`: a loaded machine is slower than 1 s
    health = {r[0]: r[1:] for r in rows}
    assert health["labels"][1:] == (1.0, 4.0, 1.0) and health["trainer"][1:] == (1.0, 0.0, 0.0)
    for process, silent in (("labels", 95), ("trainer", 2), ("replay", 300), ("supervisor", 1)):
        assert silent <= health[process][0] <= silent + late, (process, health[process], late)


def test_feature_stats_topic_follows_the_config():
    cfg = load_config(env={})
    assert feature_stats_topic(cfg) == "feature_stats"
    cfg = load_config(env={}, topics={"feature_stats": "t9_feature_stats"})
    assert feature_stats_topic(cfg) == "t9_feature_stats"


def test_operator_alert_overrides_change_the_page_and_grafana_rules(store):
    """``dashboard.alerts``: a shorter backlog window fires on 20 s of backlog that the default minute ignores;
    the Grafana export carries the same window and threshold; an unknown rule id is refused."""
    from dashboards.grafana import alert_rules_json
    from dashboards.sink import stats_rows

    cfg = load_config(env={}, dashboard={"alerts": {"training_backlog": {"threshold": 5000, "window_s": 20}}})
    rules = alerts.configured(cfg.dashboard.alerts)
    assert rules["training_backlog"].window_s == 20 and rules["training_backlog"].threshold == 5000
    assert rules["quality_drop"] == alerts.RULES["quality_drop"]
    now = int(time.time() * 1000)
    stats = [s for dt in (15_000, 5_000) for s in (
        schema.ServiceStats("labels", now - dt, {"examples_out": 9000.0}, "l-1"),
        schema.ServiceStats("trainer", now - dt, {"examples_trained": 2000.0}))]
    store.insert("service_stats", stats_rows(stats))

    def backlog(rs):
        return next(a for a in alerts.evaluate(store, rules=rs) if a["rule"] == "training_backlog")

    assert backlog(rules)["firing"] and backlog(rules)["value"] == 7000.0, str(backlog(rules))
    assert not backlog(alerts.RULES)["firing"]  # the default needs a whole minute of backlog
    exported = {r["uid"]: r for r in alert_rules_json("db", cfg.dashboard.alerts)}["streamrec-training-backlog"]
    assert exported["data"][0]["relativeTimeRange"]["from"] == 20
    assert exported["data"][2]["model"]["conditions"][0]["evaluator"]["params"] == [5000]
    with pytest.raises(ValueError, match="unknown rule 'backlog'.*training_backlog"):
        alerts.configured({"backlog": cfg.dashboard.alerts["training_backlog"]})
