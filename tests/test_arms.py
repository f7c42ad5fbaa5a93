"""Arms side by side (serving.arms, docs/arms.md) in the trainer and the metrics store.

* Two arms' (and a shadow arm's) prediction rows for the same example ids coexist in chDB, re-delivery
  changes nothing, and the comparison panel's numbers (online CTR / conversion rate of the traffic each arm
  served with Wilson intervals; offline AUC with a DeLong interval and NE with a delta-method interval)
  match numpy, scipy and scikit-learn on the same rows; the intervals' widths agree with a bootstrap.
* A predictions table made before arms is rebuilt with its rows (arm ``main``, logged traffic) and keeps
  working beside a second arm's rows.
* (The live page draws the comparison in Chromium: tests/test_dashboard_page.py.)
* A real trainer with ``learn_from: own`` on a broker trains only the examples its arm served, scores and
  publishes the others (counted as ``examples_other_arm``), and reports under its arm's name.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score

from conftest import read_topics
from config import arm_trainer_config, replace
from dashboards import alerts
from dashboards import queries as q
from dashboards.sink import batch_problem, prediction_rows, stats_rows
from streams import schema
from streams.bus import kafka_io
from streams.metrics import normalized_entropy

N = 4000
SERVED = {"a": 0.7, "b": 0.25, "": 0.05}  # the arms that served the traffic ('' = logged, not served by streamrec)
CTR = {"a": 0.12, "b": 0.08, "": 0.10}  # each arm's traffic clicks at its own rate
NOISE = {"a": 0.7, "b": 1.4, "shadow": 1.0}  # score noise of each arm's model: a is the better ranker


def _traffic(rng, now_ms: int):
    """N examples in two domains; each served by an arm (or logged); every arm's model scores every example."""
    served = rng.choice(list(SERVED), N, p=list(SERVED.values()))
    click = rng.random(N) < np.vectorize(CTR.get)(served)
    conv = click & (rng.random(N) < 0.25)
    domains = np.where(rng.random(N) < 0.5, "feed", "video")
    ids = [f"x{i}" for i in range(N)]
    batches = {}
    for arm, noise in NOISE.items():
        p = 1 / (1 + np.exp(-(-2.2 + 1.3 * click + rng.normal(0, noise, N))))
        batches[arm] = schema.PredictionBatch(
            model_version=7, trained_ts=now_ms - 30_000, example_ids=ids, domains=domains.tolist(),
            event_ts=[now_ms - 90_000] * N, emitted_ts=[now_ms - 60_000] * N, p_click=p.tolist(),
            p_conversion=(p / 4).tolist(), click=click.astype(int).tolist(), conversion=conv.astype(int).tolist(),
            arm=arm, served_arms=served.tolist(), served_versions=[3 if s else 0 for s in served])
    return served, click, conv, domains, batches


def _wilson(k: int, n: int) -> tuple[float, float]:
    ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
    return 100 * ci.low, 100 * ci.high


def _delong_se(y: np.ndarray, p: np.ndarray) -> float:
    """DeLong's standard error from the placement values, by sorting (ties count half)."""
    pos, neg = np.sort(p[y == 1]), np.sort(p[y == 0])
    v10 = (np.searchsorted(neg, pos, "left") + np.searchsorted(neg, pos, "right")) / 2 / len(neg)
    v01 = (2 * len(pos) - np.searchsorted(pos, neg, "left") - np.searchsorted(pos, neg, "right")) / 2 / len(pos)
    return float(np.sqrt(v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg)))


def _ne_se(y: np.ndarray, p: np.ndarray) -> float:
    """Delta method, written independently of the SQL: the gradient of NE = mean(ll) / H(mean(y)) applied to
    the sample covariance of (ll, y), over n."""
    p = np.clip(p, 1e-7, 1 - 1e-7)
    ll = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    L, b = ll.mean(), y.mean()
    H = -(b * np.log(b) + (1 - b) * np.log(1 - b))
    grad = np.array([1 / H, -L * np.log((1 - b) / b) / H ** 2])
    return float(np.sqrt(grad @ np.cov(np.vstack([ll, y])) @ grad / len(y)))


def _bootstrap_se(y, p, metric, rng, rounds=300) -> float:
    idx = rng.integers(0, len(y), (rounds, len(y)))
    return float(np.std([metric(y[i], p[i]) for i in idx], ddof=1))


def test_two_arms_rows_coexist_and_the_comparison_matches_numpy(store):
    now = int(time.time() * 1000)
    rng = np.random.default_rng(16)
    served, click, conv, domains, batches = _traffic(rng, now)
    store.insert("predictions", prediction_rows(list(batches.values()), now))
    store.insert("predictions", prediction_rows([batches["a"]], now + 1))  # at-least-once: a's batch again

    # every arm keeps a row per example and objective, the same example ids side by side
    per_arm = dict(store.query("SELECT arm, count() FROM {db}.predictions FINAL GROUP BY arm").rows)
    assert per_arm == {arm: 2 * N for arm in NOISE}
    same = store.query("SELECT example_id, groupArray(arm), groupArray(served_arm), groupArray(served_version) "
                       "FROM {db}.predictions FINAL WHERE objective = 'click' AND example_id = 'x0' "
                       "GROUP BY example_id").rows
    (_, arms, served_arms, versions), = same
    assert sorted(arms) == sorted(NOISE) and set(served_arms) == {served[0]} and set(versions) == {3 if served[0] else 0}

    rows = {r["arm"]: r for r in store.query(q.render(q.ARM_COMPARISON, "live"), q.live_parameters(10)).records()}
    assert list(rows) == ["a", "b", "shadow", q.LOGGED_ARM]  # arms by name, logged traffic last
    for arm in ("a", "b", ""):
        row = rows[arm or q.LOGGED_ARM]
        m = served == arm
        n, k, c = int(m.sum()), int(click[m].sum()), int(conv[m].sum())
        assert row["served"] == n
        assert row["ctr_pct"] == pytest.approx(100 * k / n) and row["cvr_pct"] == pytest.approx(100 * c / n)
        assert (row["ctr_pct_lo"], row["ctr_pct_hi"]) == pytest.approx(_wilson(k, n), rel=1e-9)
        assert (row["cvr_pct_lo"], row["cvr_pct_hi"]) == pytest.approx(_wilson(c, n), rel=1e-9)
    assert rows["shadow"]["served"] == 0 and rows["shadow"]["ctr_pct"] is None  # a shadow arm serves nothing
    assert rows[q.LOGGED_ARM]["scored"] == 0 and rows[q.LOGGED_ARM]["auc"] is None  # no model is called ''

    boot = np.random.default_rng(1)
    for arm in NOISE:
        row = rows[arm]
        y = click.astype(np.int64)
        p = np.asarray(batches[arm].p_click, np.float32).astype(np.float64)  # the column is Float32
        auc, ne = roc_auc_score(y, p), normalized_entropy(y, p)
        assert row["scored"] == N
        assert row["auc"] == pytest.approx(auc, abs=1e-12) and row["ne"] == pytest.approx(ne, rel=1e-6)
        se = _delong_se(y, p)
        assert (row["auc_lo"], row["auc_hi"]) == pytest.approx((auc - q.Z95 * se, auc + q.Z95 * se), abs=1e-9)
        se_ne = _ne_se(y, p)
        assert (row["ne_lo"], row["ne_hi"]) == pytest.approx((ne - q.Z95 * se_ne, ne + q.Z95 * se_ne), rel=1e-6)
        # the intervals are honest: their widths are within 15% of a bootstrap's (300 resamples)
        assert se == pytest.approx(_bootstrap_se(y, p, roc_auc_score, boot), rel=0.15), arm
        assert se_ne == pytest.approx(_bootstrap_se(y, p, normalized_entropy, boot), rel=0.15), arm
    # the better model (less score noise) is ahead by more than the intervals' widths
    assert rows["a"]["auc_lo"] > rows["b"]["auc_hi"] and rows["a"]["ne_hi"] < rows["b"]["ne_lo"]

    # the domain filter applies to both halves
    video = {r["arm"]: r for r in store.query(q.render(q.ARM_COMPARISON, "live"),
                                              q.live_parameters(10, "video")).records()}
    assert video["a"]["served"] == int(((served == "a") & (domains == "video")).sum())
    assert video["b"]["scored"] == int((domains == "video").sum())


def test_prediction_rows_carry_arms():
    b = schema.PredictionBatch(model_version=1, trained_ts=5, example_ids=["e1", "e2"], domains=["feed", "feed"],
                               event_ts=[1, 2], emitted_ts=[3, 4], p_click=[0.1, 0.2], p_conversion=[0.01, 0.02],
                               click=[0, 1], conversion=[0, 0])
    rows = prediction_rows([b], 9).to_pydict()
    assert set(rows["arm"]) == {"main"} and set(rows["served_arm"]) == {""} and set(rows["served_version"]) == {0}
    assert batch_problem(b) is None
    bad = schema.PredictionBatch(**{**{f: getattr(b, f) for f in b.__struct_fields__}, "served_arms": ["a"]})
    assert "served_arms" in batch_problem(bad)


# the predictions table as streamrec created it before arms
OLD_PREDICTIONS = """
CREATE TABLE IF NOT EXISTS {db}.predictions (
    example_id String, objective LowCardinality(String), domain LowCardinality(String), model_version UInt64,
    score Float32, label UInt8, event_ts DateTime64(3, 'UTC'), emitted_ts DateTime64(3, 'UTC'),
    trained_ts DateTime64(3, 'UTC'), inserted_ts DateTime64(3, 'UTC')
) ENGINE = ReplacingMergeTree(inserted_ts)
ORDER BY (objective, domain, example_id)
TTL toDateTime(trained_ts) + INTERVAL {ttl} DAY"""


def test_an_older_predictions_table_gains_arms_and_keeps_its_rows(chdb_client):
    from dashboards.store import TABLES, Store

    db = "migrate_predictions"
    chdb_client.command(f"CREATE DATABASE IF NOT EXISTS {db}")
    chdb_client.command(OLD_PREDICTIONS.format(db=db, ttl=30))
    now = int(time.time() * 1000)
    ts = f"fromUnixTimestamp64Milli({now - 5_000}, 'UTC')"
    values = ", ".join(f"('e{i}', '{o}', 'feed', 12, {0.1 + 0.1 * i}, {int(i % 2 == 1)}, {ts}, {ts}, {ts}, {ts})"
                       for i in range(6) for o in ("click", "conversion"))
    chdb_client.command(f"INSERT INTO {db}.predictions VALUES {values}")
    s = Store(chdb_client, db)
    s.ensure_schema()
    key = s.query("SELECT sorting_key FROM system.tables WHERE database = {d:String} AND name = 'predictions'",
                  {"d": db}).rows
    assert key == [("arm, objective, domain, example_id",)]
    assert s.query("SELECT arm, served_arm, served_version, model_version, count() FROM {db}.predictions FINAL "
                   "GROUP BY ALL").rows == [("main", "", 0, 12, 12)]
    assert not any(s._migrate(t, ddl) for t, ddl in TABLES.items())  # idempotent once migrated
    # a second arm scores the same examples: its rows join the old ones, none replaced
    new = schema.PredictionBatch(model_version=3, trained_ts=now - 1_000, example_ids=[f"e{i}" for i in range(6)],
                                 domains=["feed"] * 6, event_ts=[now - 9_000] * 6, emitted_ts=[now - 8_000] * 6,
                                 p_click=[0.5] * 6, p_conversion=[0.1] * 6, click=[i % 2 for i in range(6)],
                                 conversion=[0] * 6, arm="b", served_arms=["b"] * 6, served_versions=[2] * 6)
    s.insert("predictions", prediction_rows([new], now))
    assert s.query("SELECT arm, count() FROM {db}.predictions FINAL GROUP BY arm ORDER BY arm").rows == [
        ("b", 12), ("main", 12)]
    rows = {r["arm"]: r for r in s.query(q.render(q.ARM_COMPARISON, "live"), q.live_parameters(5)).records()}
    assert rows["main"]["auc"] == pytest.approx(6 / 9) and rows["main"]["served"] == 0  # old rows: scored, logged
    assert rows["b"]["served"] == 6 and rows["b"]["ctr_pct"] == pytest.approx(50.0)
    assert rows[q.LOGGED_ARM]["served"] == 6 and rows[q.LOGGED_ARM]["scored"] == 0
    # every panel of the page still runs on the rebuilt table
    from dashboards.definitions import DASHBOARDS

    for p in DASHBOARDS["overview"].panels:
        s.query(q.render(p.sql, "live"), q.live_parameters(5))


def test_two_trainers_stats_keep_apart_and_the_backlog_follows_the_slowest(store):
    now = int(time.time() * 1000)
    # arm a (learn_from own) trained 1000 and scored 2000 for the other arm; arm b trained 4000; labels emitted 6000
    stats = [schema.ServiceStats("trainer", now, {"examples_trained": 1000.0, "examples_other_arm": 2000.0}, "a"),
             schema.ServiceStats("trainer", now, {"examples_trained": 4000.0, "examples_other_arm": 0.0}, "b"),
             schema.ServiceStats("labels", now - 1, {"examples_out": 6000.0}, "l-1")]
    store.insert("service_stats", stats_rows(stats))
    assert store.query("SELECT instance, value FROM {db}.service_stats FINAL WHERE component = 'trainer' AND "
                       "name = 'examples_trained' ORDER BY instance").rows == [("a", 1000.0), ("b", 4000.0)]
    # the slowest arm is a: it took 3000 examples (trained or scored), b 4000: 6000 - 3000 behind
    params = q.live_parameters(10)
    assert [r[2] for r in store.query(q.render(q.TRAINING_BACKLOG, "live"), params).rows] == [3000.0]
    lag = {r[1]: r[2] for r in store.query(q.render(q.LAG, "live"), params).rows}
    assert lag["trainer behind labels"] == 3000.0
    assert not [a for a in alerts.evaluate(store) if a.get("error")]  # the backlog alert's SQL runs on it too


def _examples(n: int, seed: int = 3) -> list[schema.Example]:
    rng = np.random.default_rng(seed)
    arms = rng.choice(["a", "b", ""], n, p=[0.6, 0.3, 0.1])
    now = int(time.time() * 1000)
    return [schema.Example(
        example_id=f"ex{i}", click=int(rng.random() < 0.3), conversion=0, emitted_ts=now,
        impression=schema.Impression(event_id=f"imp{i}", ts=now - 60_000 + i, user_id=int(rng.integers(0, 500)),
                                     ad_id=int(rng.integers(0, 100)), campaign_id=1, advertiser_id=1,
                                     domain=schema.DOMAINS[i % 5], arm=str(arms[i]),
                                     model_version=4 if arms[i] else 0))
        for i in range(n)]


def test_learn_from_own_trains_only_its_arms_examples(cfg):
    from trainer.loop import Trainer

    examples = _examples(900)
    prod = kafka_io.make_producer(cfg.kafka.bootstrap_servers)
    for ex in examples:
        kafka_io.produce(prod, cfg.topics.examples, schema.encode(ex), key=schema.user_key(ex.impression))
    assert prod.flush(30) == 0
    cfg = replace(cfg, trainer={"device": "cpu", "batch_size": 128, "user_model": False},
                  serving={"arms": [{"name": "a", "share": 0.7, "learn_from": "own"},
                                    {"name": "b", "share": 0.3, "learn_from": "all"}]})
    own = {ex.example_id for ex in examples if ex.impression.arm == "a"}
    counters = {}
    for arm in ("a", "b"):
        tcfg = arm_trainer_config(cfg, arm)
        svc = Trainer(tcfg, resume=False, record_ids=True)
        counters[arm] = svc.run(idle_exit_s=1.0)
        if arm == "a":
            assert set(svc.trained_ids) == own and len(svc.trained_ids) == len(own)
        else:
            assert len(set(svc.trained_ids)) == len(examples)  # learn_from all: every logged example
        assert Path(tcfg.trainer.checkpoint_dir) == Path(cfg.trainer.checkpoint_dir, arm)  # arms apart
        assert any(Path(tcfg.trainer.checkpoint_dir).iterdir())
    assert counters["a"]["examples_trained"] == len(own)
    assert counters["a"]["examples_other_arm"] == len(examples) - len(own)
    assert counters["b"]["examples_trained"] == len(examples) and counters["b"]["examples_other_arm"] == 0

    # predictions: each trainer scored every example (a: the others too, for evaluation), under its arm, with
    # the serving arm and version of each example
    served = {ex.example_id: (ex.impression.arm, ex.impression.model_version) for ex in examples}
    seen: dict[str, dict[str, tuple[str, int]]] = {"a": {}, "b": {}}
    for m in read_topics(cfg, cfg.topics.predictions):
        pb = schema.decode(m.value(), schema.PredictionBatch)
        sa = pb.served_arms or [""] * len(pb.example_ids)
        sv = pb.served_versions or [0] * len(pb.example_ids)
        seen[pb.arm].update({e: (a, v) for e, a, v in zip(pb.example_ids, sa, sv)})
    assert seen["a"] == served and seen["b"] == served
    # stats: one series per arm, a's with the examples it left to the other arm
    stats = [schema.decode(m.value(), schema.ServiceStats) for m in read_topics(cfg, cfg.topics.service_stats)]
    last = {s.instance: s.values for s in stats if s.component == "trainer"}
    assert set(last) == {"a", "b"}
    assert last["a"]["examples_other_arm"] == len(examples) - len(own)


def test_train_names_an_unknown_arm(tmp_path, capsys):
    import argparse

    from config import load_config
    from trainer.service import run as train_cli

    cfg = load_config(env={}, kafka={"bootstrap_servers": "127.0.0.1:1"},
                      trainer={"checkpoint_dir": str(tmp_path)})
    args = argparse.Namespace(resume=False, fresh=False, max_examples=None, idle_exit=None, checkpoint_dir=None,
                              record_trained_ids=False, arm="zz")
    assert train_cli(args, cfg) == 2
    assert "--arm: no arm 'zz' in serving.arms (known: main)" in capsys.readouterr().err
