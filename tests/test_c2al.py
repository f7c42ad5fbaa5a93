"""C2AL (trainer/cohorts.py): cohort assignment, the cohort-contrastive labels, the training-only heads (absent
from every serving export and published version), target finding, per-cohort metrics in the store, and
``bench cohorts`` on a tiny stream. All in-process on tiny data."""

from __future__ import annotations

import time
from collections import Counter

import msgspec
import numpy as np
import pytest
import torch

from config import ConfigError, TrainerConfig
from streams import schema
from streams.sources.generate import MINORITY_COUNTRIES, GeneratorConfig, simulate
from trainer.cohorts import (CohortAssigner, CohortTargets, c2al_labels, cohort_metrics, find_targets)
from trainer.features import featurize
from trainer.model import Learner

TC = TrainerConfig(batch_size=64, device="cpu", backend="torch", user_model=False, hash_buckets=500,
                   embedding_dim=8, cat_slots=1, dense_dim=2, history_len=2)
C2AL = msgspec.structs.replace(TC, c2al=True, c2al_cohorts=("*/*/br", "video/*/*"), c2al_weight=1.0)


def _imp(i: int, user: int, domain: str = "feed", country: str = "us") -> schema.Impression:
    return schema.Impression(event_id=f"i{i}", ts=1_767_225_600_000 + i, user_id=user, ad_id=1 + i % 5,
                             campaign_id=1, advertiser_id=1, domain=domain, country=country, dense=[0.1 * i, 1.0])


def _examples(n: int, seed: int = 0) -> list[schema.Example]:
    rng = np.random.default_rng(seed)
    doms, ctry = ("feed", "video", "search"), ("us", "br", "de")
    return [schema.Example(example_id=f"e{i}", impression=_imp(i, int(rng.integers(1, 20)), doms[i % 3],
                                                               ctry[(i // 3) % 3]), click=int(rng.random() < 0.3),
                           conversion=0) for i in range(n)]


def test_cohorts_name_domain_activity_country_and_count_each_impression_once():
    a = CohortAssigner(rows=1024)
    # user 1: 40 impressions over several batches; user 2 one, on another surface and country
    first = a.assign([_imp(i, 1) for i in range(2)] + [_imp(99, 2, "video", "br")])
    assert first == ["feed/new/us", "feed/new/us", "video/new/br"]
    later = a.assign([_imp(i, 1) for i in range(2, 40)])
    assert later[0] == "feed/new/us" and later[1] == "feed/casual/us"  # 3rd impression new, 4th casual
    assert later[27] == "feed/casual/us" and later[28] == "feed/heavy/us"  # 30th casual, 31st heavy
    assert int(a.activity(np.array([1, 2, 3], np.uint64)).tolist()[0]) == 40
    assert a.activity(np.array([2, 3], np.uint64)).tolist() == [1, 0]
    # the table is bounded whatever the number of users, and round-trips through checkpoints
    a.assign([_imp(i, 10_000 + i) for i in range(5000)])
    assert a.counts.shape == (1024,) and int(a.counts.sum()) == 41 + 5000
    b = CohortAssigner.from_state(a.state())
    assert b.assign([_imp(0, 1)]) == a.assign([_imp(0, 1)]) == ["feed/heavy/us"]


def test_labels_agree_inside_the_cohort_and_conflict_outside():
    t = CohortTargets(("*/*/br", "video/*/*", "*/new/*"))
    keys = ["feed/new/br", "video/heavy/us", "video/new/br", "search/heavy/de"]
    m = t.masks(keys)
    assert m.tolist() == [[1, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 0]]
    y = c2al_labels(np.array([1, 1, 0, 1], np.float32), m)
    assert y.tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 0], [0, 0, 0]]  # a click outside cohort k is a 0 for head k
    with pytest.raises(ValueError, match="domain/activity/country"):
        CohortTargets(("br",))
    with pytest.raises(ConfigError, match="c2al_cohorts"):
        msgspec.structs.replace(TC, c2al=True)


def test_c2al_heads_learn_the_cohort_labels_and_shape_the_shared_layers():
    exs = _examples(64 * 4)
    lr, base = Learner(C2AL), Learner(TC)
    assert lr.model.c2al is not None and base.model.c2al is None
    # same initial shared weights: the heads are built after everything the serving path holds
    for k, v in base.model.state_dict().items():
        assert torch.equal(v, lr.model.state_dict()[k]), k
    losses = []
    for i in range(0, len(exs), 64):
        fb = featurize(exs[i:i + 64], C2AL, cohorts=lr.cohorts)
        losses.append(lr.train_step(fb).c2al_loss)
        base.train_step(featurize(exs[i:i + 64], TC, cohorts=base.cohorts))
    assert losses[0] > 0 and losses[-1] < losses[0]
    # the auxiliary loss reached the shared layers: the serving weights differ from the run without it
    assert not torch.equal(lr.model.bottom.weight, base.model.bottom.weight)
    with pytest.raises(ValueError, match="cohorts=learner.cohorts"):
        lr.train_step(featurize(exs[:8], C2AL))


def test_c2al_heads_are_absent_from_exports_and_published_versions(tmp_path):
    from trainer import export
    from trainer.publish import Publisher, VersionStore

    lr = Learner(C2AL)
    exs = _examples(128)
    lr.train_step(featurize(exs, C2AL, cohorts=lr.cohorts))
    assert any(k.startswith("c2al.") for k in lr.model.state_dict())
    dense = export.dense_state(lr.model)
    assert dense and not any(k.startswith(("c2al.", "aux.", "emb.")) for k in dense)
    # the serving export loads into a model built without the heads and scores exactly as the learner does
    root = tmp_path / "export"
    path = export.export(lr, root)
    blob = torch.load(path / "model.pt", weights_only=True)
    assert not any(k.startswith("c2al.") for k in blob["dense"])
    m = export.load(root, device="cpu")
    assert getattr(m.model, "c2al", None) is None
    fb = featurize(exs[:32], C2AL)
    p_serving = m.model(fb.to_torch("cpu"))[0].detach().numpy()
    np.testing.assert_allclose(p_serving, lr.score(fb)[0], rtol=1e-5, atol=1e-6)
    # a published version (full, then a delta) holds none either, and serves the same scores
    pub = Publisher(tmp_path / "pub", full_every=5)
    pub.publish(lr, examples_trained=128)
    lr.train_step(featurize(exs[32:96], C2AL, cohorts=lr.cohorts))
    pub.publish(lr, examples_trained=192)
    for f in (tmp_path / "pub").rglob("dense.pt"):
        assert not any(k.startswith("c2al.") for k in export.tensor_load(f.read_bytes())), f
    got = VersionStore(tmp_path / "pub").load()
    assert got.steps == lr.steps and getattr(got.model, "c2al", None) is None
    np.testing.assert_allclose(got.model(fb.to_torch("cpu"))[0].detach().numpy(), lr.score(fb)[0], rtol=1e-5,
                               atol=1e-6)
    # the checkpoint keeps them (training continues bit-exactly)
    st = export.tensor_load(export.tensor_bytes(lr.state()))  # as checkpoints store it (weights-only load)
    assert any(k.startswith("c2al.") for k in st["dense"]) and "cohorts" in st
    again = Learner(C2AL)
    again.load_state(st)
    assert torch.equal(again.model.c2al.head_w, lr.model.c2al.head_w)
    assert np.array_equal(again.cohorts.counts, lr.cohorts.counts)


def test_find_targets_picks_the_minority_cohort_a_model_serves_worst():
    rng = np.random.default_rng(0)
    n = 20_000
    keys = [f"{d}/casual/{c}" for d, c in zip(rng.choice(["feed", "video"], n, p=[0.7, 0.3]),
                                               rng.choice(["us", "de", "br"], n, p=[0.6, 0.3, 0.1]))]
    p_true = rng.uniform(0.05, 0.5, n)
    click = (rng.random(n) < p_true).astype(float)
    br = np.array([k.endswith("/br") for k in keys])
    p = np.where(br, rng.uniform(0.05, 0.5, n), p_true)  # the model knows nothing of br
    found = find_targets(keys, click, p, max_share=0.2, top=2)
    assert found[0].pattern == "*/*/br" and found[0].rel_ne > 1.05
    assert all(c.pattern not in ("*/*/us", "feed/*/*") for c in found)  # majorities are never targets
    m = cohort_metrics(keys, click, p, ["*/*/br", "*/*/us"])
    assert m["*/*/br"]["ne"] > m["*/*/us"]["ne"] and m["*/*/br"]["share"] == pytest.approx(br.mean())


def test_the_minority_world_changes_only_the_minority():
    g = GeneratorConfig(n_impressions=3000, seed=5, n_users=300, n_ads=100)
    plain, mino = simulate(g), simulate(msgspec.structs.replace(g, minority_share=0.3))
    imps = [r for r in mino.records if isinstance(r, schema.Impression)]
    is_min = np.array([i.country in MINORITY_COUNTRIES for i in imps])
    assert 0.05 < is_min.mean() < 0.6
    by_id = {r.event_id: r for r in plain.records if isinstance(r, schema.Impression)}
    assert all(by_id[i.event_id].user_id == i.user_id and by_id[i.event_id].ad_id == i.ad_id for i in imps)
    p0 = dict(zip(plain.truth.column("impression_id").to_pylist(), plain.truth.column("p_click").to_numpy()))
    p1 = dict(zip(mino.truth.column("impression_id").to_pylist(), mino.truth.column("p_click").to_numpy()))
    same = np.array([p0[i.event_id] == p1[i.event_id] for i in imps])
    assert same[~is_min].all() and not same[is_min].any()  # the majority's truth untouched; the minority's not


def test_cohorts_reach_the_store_and_the_panel(store):
    from dashboards import queries as q
    from dashboards.sink import batch_problem, prediction_rows

    now = int(time.time() * 1000)
    n = 400
    rng = np.random.default_rng(3)
    click = (rng.random(n) < 0.3).astype(int)
    cohorts = ["feed/heavy/us" if i % 4 else "video/new/br" for i in range(n)]
    good = np.where(np.array(cohorts) == "feed/heavy/us", 0.1 + 0.6 * click, rng.uniform(0.1, 0.7, n))
    pb = schema.PredictionBatch(model_version=1, trained_ts=now - 1000, example_ids=[f"c{i}" for i in range(n)],
                                domains=[c.split("/")[0] for c in cohorts], event_ts=[now - 5000] * n,
                                emitted_ts=[now - 4000] * n, p_click=good.tolist(), p_conversion=[0.01] * n,
                                click=click.tolist(), conversion=[0] * n, cohorts=cohorts)
    assert batch_problem(msgspec.structs.replace(pb, cohorts=cohorts[:3])).startswith("invalid: PredictionBatch coh")
    store.insert("predictions", prediction_rows([pb], now))
    rows = {r["cohort"]: r for r in store.query(q.render(q.COHORTS, "live"), q.live_parameters(5)).records()}
    assert set(rows) == {"feed/heavy/us", "video/new/br"}
    assert rows["feed/heavy/us"]["n"] == 300 and rows["video/new/br"]["n"] == 100
    assert rows["video/new/br"]["ne"] > rows["feed/heavy/us"]["ne"]  # worst first: the page's order
    assert list(rows)[0] == "video/new/br"
    assert rows["feed/heavy/us"]["auc"] == pytest.approx(1.0)


def test_bench_cohorts_on_a_tiny_stream():
    from benchmarks import cohorts as bench

    res = bench.run(0, 2000, 0.5, 0.3, 2, lambda s: None, model=TC, min_clicks=3, noise=True)
    assert 1 <= len(res["targets"]) <= 2 and all(t.count("/") == 2 for t in res["targets"])
    (ne_b, auc_b), (ne_c, auc_c) = res["overall"]
    assert 0.8 < ne_b < 1.1 and 0.8 < ne_c < 1.1 and auc_b > 0.5 and auc_c > 0.5 and ne_b != ne_c
    assert res["oracle"]["overall"][0] < min(ne_b, ne_c)  # the truth beats both models
    assert 0 < res["share_targeted"] < 0.5
    assert set(res["targets"]) <= set(res["cohorts"])
    if len(res["targets"]) == 1:  # one target: "targeted together" is that cohort's row
        assert res["cohorts"][res["targets"][0]][0]["ne"] == pytest.approx(res["targeted"][0][0])
    # the noise floor: the baseline from another initialisation, on the same examples
    assert res["noise"][0][0] != ne_b and abs(res["noise"][0][0] - ne_b) < 0.05
    rows = bench.table_rows(0, res)
    assert len(rows) == 4 + len(res["cohorts"]) and all(len(r) == 8 for r in rows)


def test_a_c2al_trainer_on_the_broker_names_every_prediction_s_cohort(cfg):
    # the real stack's one test here: `streamrec train` (in process) with trainer.c2al over the examples topic
    from config import replace
    from streams.bus import kafka_io
    from trainer.loop import Trainer

    exs = _examples(600, seed=4)
    prod = kafka_io.make_producer(cfg.kafka.bootstrap_servers)
    for ex in exs:
        kafka_io.produce(prod, cfg.topics.examples, schema.encode(ex), key=schema.user_key(ex.impression))
    prod.flush(30)
    svc = Trainer(replace(cfg, trainer={"device": "cpu", "batch_size": 128, "user_model": False, "c2al": True,
                                        "c2al_cohorts": ["*/*/br"], "hash_buckets": 1000}), resume=False)
    assert svc.run(idle_exit_s=1.0)["examples_trained"] == 600
    assert svc.learner.model.c2al is not None
    c = kafka_io.make_consumer(cfg.kafka.bootstrap_servers, "c2al-reader")
    c.assign(kafka_io.topic_partitions([cfg.topics.predictions], cfg.topics.partitions))
    named: dict[str, str] = {}
    deadline = time.monotonic() + 20
    try:
        while len(named) < 600 and time.monotonic() < deadline:
            for m in c.consume(num_messages=1000, timeout=0.5):
                if m.error() is None:
                    pb = schema.decode(m.value(), schema.PredictionBatch)
                    assert len(pb.cohorts) == len(pb.example_ids)
                    named.update(zip(pb.example_ids, pb.cohorts))
    finally:
        c.close()
    assert len(named) == 600
    # exactly each example's domain, country and activity: its user's earlier impressions (a user's examples
    # share a partition, so the trainer reads them in order whatever the interleaving across partitions)
    seen: Counter = Counter()
    for e in exs:
        imp = e.impression
        act = "new" if seen[imp.user_id] < 3 else "casual" if seen[imp.user_id] < 30 else "heavy"
        seen[imp.user_id] += 1
        assert named[e.example_id] == f"{imp.domain}/{act}/{imp.country}", e.example_id
    assert {k.split("/")[1] for k in named.values()} == {"new", "casual", "heavy"}
