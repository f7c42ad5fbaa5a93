"""SOLARIS: the pair cache (hits, expiry, bound, dead letters), the pair predictor (budget, candidates), the VM's
``solaris_in`` block, the bench's SOLARIS rows on a tiny stream, and the precompute service feeding a VM trainer
through the real broker (SIGKILL of the service mid-stream)."""

from __future__ import annotations

import time

import msgspec
import numpy as np
import pytest
import torch

from config import SolarisConfig, TrainerConfig
from embedding_store.pair_cache import PairCache
from streams import schema
from trainer.export import ExportError, feature_spec, serving_model
from trainer.features import featurize, impression_batch
from trainer.model import Learner
from trainer.solaris import PairPredictor, SolarisView, pair_impression, pair_logits, score_pairs

NOW = 1_700_000_000_000


def _imp(i: int, user: int, ad: int, ts: int = NOW, domain: str = "feed") -> schema.Impression:
    return schema.Impression(event_id=f"imp-0-{i}", ts=ts, user_id=user, ad_id=ad, campaign_id=ad // 3 + 1,
                             advertiser_id=ad // 10 + 1, domain=domain, position=i % 3, dense=[0.1],
                             history=[ad, ad + 1])


def _rec(**kw) -> schema.SolarisPairs:
    base = {"model_version": 3, "ts": NOW, "user_ids": [1, 2], "ad_ids": [5, 6], "p_click": [0.2, 0.4],
            "p_conversion": [0.01, 0.1]}
    return schema.SolarisPairs(**{**base, **kw})


# ---- the cache --------------------------------------------------------------------------------------------
def test_cache_hits_expiry_and_bound():
    c = PairCache(ttl_s=60, max_entries=3)
    assert c.apply(_rec(), NOW) is None
    pc, pv, hit, age = c.get([1, 2, 1, 9], [5, 6, 6, 5], NOW + 10_000)
    assert hit.tolist() == [True, True, False, False]
    np.testing.assert_allclose(pc, [0.2, 0.4, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(pv, [0.01, 0.1, 0, 0], rtol=1e-6)
    assert age.tolist() == [10.0, 10.0, 0.0, 0.0]
    # a later computation replaces the pair; an earlier one arriving late does not
    c.apply(_rec(ts=NOW + 5_000, user_ids=[1], ad_ids=[5], p_click=[0.3], p_conversion=[0.0]), NOW + 5_000)
    c.apply(_rec(ts=NOW + 1_000, user_ids=[1], ad_ids=[5], p_click=[0.9], p_conversion=[0.0]), NOW + 5_000)
    assert c.counters["older_ignored"] == 1
    assert c.get([1], [5], NOW + 6_000)[0].tolist() == pytest.approx([0.3])
    # per-pair times: (1, 5) is 65 s old at the first, 55 s at the second
    assert c.get([1, 1], [5, 5], [NOW + 70_000, NOW + 60_000])[2].tolist() == [False, True]
    assert c.get([2], [6], NOW + 61_000)[2].tolist() == [False]  # expired: counted apart from misses
    s = c.stats()
    assert s["solaris_expired"] == 2 and s["solaris_misses"] == 2 and s["solaris_hits"] == 4
    assert s["solaris_hit_rate"] == pytest.approx(4 / 8) and s["solaris_age_p50_s"] == pytest.approx(10.0)
    # the bound: the least recently written leaves first ((2, 6); (1, 5) was rewritten)
    c.put([3, 4], [7, 8], [0.1, 0.1], [0.0, 0.0], version=4, ts_ms=NOW + 7_000)
    assert len(c) == 3 and c.counters["evictions"] == 1
    assert c.get([2, 1, 3, 4], [6, 5, 7, 8], NOW + 8_000, count=False)[2].tolist() == [False, True, True, True]
    # too old on arrival: not stored
    assert c.apply(_rec(ts=NOW - 120_000, user_ids=[8], ad_ids=[8], p_click=[0.5], p_conversion=[0.1]), NOW) is None
    assert c.counters["expired_on_arrival"] == 1 and not c.get([8], [8], NOW, count=False)[2][0]


@pytest.mark.parametrize("rec,reason", [
    (dict(ad_ids=[5]), "shape"),
    (dict(p_click=[float("nan"), 0.2]), "NaN"),
    (dict(p_click=[1.5, 0.2]), "outside [0, 1]"),
    (dict(p_conversion=[0.5, 0.1]), "above p_click"),
    (dict(user_ids=[-1, 2]), "unknown id"),
    (dict(model_version=-2), "model_version"),
    (dict(ts=NOW + 3_600_000), "future"),
    (dict(model_version=99), "future"),
])
def test_bad_records_are_refused_with_a_reason(rec, reason):
    c = PairCache(ttl_s=60)
    c.max_version = 10  # the newest FM version the VM knows
    got = c.apply(_rec(**rec), NOW)
    assert got is not None and reason in got
    assert len(c) == 0 and c.counters["dead_letters"] == 1
    assert "schema" in c.apply_raw(b'{"type": "solaris_pairs", "ts": 1}', NOW)
    assert c.counters["dead_letters"] == 2


# ---- the predictor --------------------------------------------------------------------------------------
def _targeted_stream(n: int, users: int = 40, k: int = 3, seed: int = 0) -> list[schema.Impression]:
    """Each user's ads from their own set of k (as the generator's targeting world)."""
    rng = np.random.default_rng(seed)
    sets = rng.integers(1, 200, (users, k))
    u = rng.integers(0, users, n)
    return [_imp(i, int(u[i]) + 1, int(sets[u[i], rng.integers(0, k)]), NOW + 100 * i) for i in range(n)]


def test_predictor_stays_within_budget_and_its_pairs_are_requested():
    scfg = SolarisConfig(budget=1.5, recent_ads=4, neighbours=0, domain_candidates=2)
    pred, cache = PairPredictor(scfg), PairCache(scfg.ttl_s)
    imps = _targeted_stream(3000)
    hits, planned = [], 0
    for s in range(0, len(imps), 64):
        block = imps[s:s + 64]
        hits.append(cache.get([i.user_id for i in block], [i.ad_id for i in block], block[-1].ts)[2])
        pred.observe(block)
        todo = pred.plan(block, cache, block[-1].ts)
        planned += len(todo)
        assert all(t.position == 0 and t.cat == [] and t.dense == [] for t in todo)  # the neutral context
        cache.put([t.user_id for t in todo], [t.ad_id for t in todo], np.full(len(todo), 0.1),
                  np.zeros(len(todo)), 1, block[-1].ts)
    assert planned <= 1.5 * len(imps)
    assert pred.stats()["solaris_budget_used"] == pytest.approx(planned / len(imps))
    hit = np.concatenate(hits)
    assert hit[1500:].mean() > 0.9  # a targeting set of 3 is learnt from the user's recent requests
    assert pred.counters["skipped_fresh"] > 0  # fresh pairs are not computed again
    # without targeting (ads independent of the user) the same budget predicts far less
    rng = np.random.default_rng(1)
    pred2, cache2 = PairPredictor(scfg), PairCache(scfg.ttl_s)
    rand = [_imp(i, int(rng.integers(1, 41)), int(rng.integers(1, 200)), NOW + 100 * i) for i in range(3000)]
    hits2 = []
    for s in range(0, len(rand), 64):
        block = rand[s:s + 64]
        hits2.append(cache2.get([i.user_id for i in block], [i.ad_id for i in block], block[-1].ts)[2])
        pred2.observe(block)
        todo = pred2.plan(block, cache2, block[-1].ts)
        cache2.put([t.user_id for t in todo], [t.ad_id for t in todo], np.full(len(todo), 0.1),
                   np.zeros(len(todo)), 1, block[-1].ts)
    assert np.concatenate(hits2)[1500:].mean() < 0.5


def test_candidates_recent_then_neighbours_then_domain():
    from embedding_store.ann import AnnConfig, make_index

    index = make_index(AnnConfig(dim=2, kind="numpy"))
    index.upsert(np.array([1, 2, 3]), np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), ts_ms=NOW)
    pred = PairPredictor(SolarisConfig(recent_ads=2, neighbours=1, domain_candidates=1), index)
    pred.observe([_imp(0, 2, 50), _imp(1, 3, 60), _imp(2, 1, 10), _imp(3, 1, 11), _imp(4, 1, 12),
                  _imp(5, 4, 50, domain="video"), _imp(6, 5, 50)])
    near = pred._neighbours([1])
    assert near == {1: [2]}
    assert pred.candidates(1, near[1]) == [(12, "recent"), (11, "recent"), (50, "neighbours"), (50, "domain")]
    todo = pred.plan([_imp(7, 1, 12)], None, NOW)  # budget 2 per request: the two most recent ads
    assert [(t.user_id, t.ad_id) for t in todo] == [(1, 12), (1, 11)]


# ---- the VM's input ---------------------------------------------------------------------------------------
def _tcfg(**kw) -> TrainerConfig:
    base = {"device": "cpu", "backend": "torch", "hash_buckets": 2000, "cat_slots": 0, "dense_dim": 2,
            "user_model": False, "batch_size": 64}
    return TrainerConfig(**{**base, **kw})


def test_vm_reads_the_solaris_block_and_serving_refuses_it():
    tc = _tcfg(solaris=True)
    learner = Learner(tc)
    plain = Learner(_tcfg())
    assert learner.model.bottom.in_features == plain.model.bottom.in_features + 3
    cache = PairCache(ttl_s=600)
    learner.solaris_view = SolarisView(cache)
    now = int(time.time() * 1000)
    imps = [_imp(i, 1 + i % 5, 10 + i % 7, now) for i in range(64)]
    exs = [schema.Example(example_id=i.event_id, impression=i, click=int(n % 3 == 0), conversion=0) for n, i in
           enumerate(imps)]
    cache.put([1], [10], [0.5], [0.25], version=1, ts_ms=now)
    fb = featurize(exs, tc, None, None, solaris=learner.solaris_view)
    want = [[0.0, 0.0, 1.0] if (i.user_id, i.ad_id) == (1, 10) else [0.0, 0.0, 0.0] for i in imps]
    assert fb.solaris.tolist() == want and fb.to_torch("cpu").solaris.shape == (64, 3)
    assert featurize(exs[:4], tc).solaris.tolist() == [[0.0] * 3] * 4  # no cache: zeros, present 0
    assert featurize(exs[:4], _tcfg()).solaris is None
    assert pair_logits(np.array([0.2]), np.array([0.05]), np.array([True]))[0].tolist() == pytest.approx(
        [np.log(0.25), np.log(1 / 3), 1.0])
    w0 = learner.model.solaris_wide.weight.detach().clone()
    assert w0.tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]  # starts passing the FM's logits through
    learner.train_step(fb)
    assert not torch.equal(w0, learner.model.solaris_wide.weight)  # and learns (its own learning rate)
    assert learner.opt.param_groups[1]["lr"] == 1e-2 and learner.opt.param_groups[0]["lr"] == tc.lr_dense
    b = fb.to_torch("cpu")
    with torch.no_grad():
        p1 = learner.model(b)[0]
        p2 = learner.model(type(b)(**{**b.__dict__, "solaris": torch.ones_like(b.solaris)}))[0]
    assert not torch.allclose(p1, p2)
    with pytest.raises(ValueError, match="SOLARIS"):
        impression_batch(imps[:2], tc, "cpu")
    with pytest.raises(ExportError, match="trainer.solaris"):
        serving_model(msgspec.to_builtins(tc), feature_spec(tc), "cpu", "auto", "v1")


def test_the_fm_scores_a_pair_at_the_users_latest_context():
    fm = Learner(_tcfg(role="fm"))
    req = _imp(0, 7, 3)
    pair = pair_impression(req, _imp(1, 9, 5))
    assert (pair.user_id, pair.ad_id, pair.campaign_id, pair.history, pair.domain) == (7, 5, 5 // 3 + 1, [3, 4], "feed")
    assert (pair.position, pair.dense, pair.cat) == (0, [], [])
    pc, pv = score_pairs(fm, [pair, pair_impression(req, req)])
    direct = fm.model(impression_batch([pair], fm.tcfg, "cpu"))[0].detach()
    assert pc[0] == pytest.approx(float(direct[0]), rel=1e-6) and (pv <= pc).all()


# ---- the bench's rows -------------------------------------------------------------------------------------
def test_bench_solaris_rows_on_a_tiny_stream(monkeypatch):
    from benchmarks import transfer

    keep = ("VM alone", transfer.SOLARIS, transfer.ON_DEMAND)
    monkeypatch.setattr(transfer, "VARIANTS", {k: transfer.VARIANTS[k] for k in keep})
    monkeypatch.setattr(transfer, "VM_GROUPS", (("feed", "stories", "video", "search", "display"),))
    monkeypatch.setattr(transfer, "FM", msgspec.structs.replace(transfer.FM, hash_buckets=5000))  # a fast FM
    monkeypatch.setattr(transfer, "WORLD", {**transfer.WORLD, "n_users": 500})
    res, sol = transfer.run("stationary", 1536, 256, 1.0, 0, lambda s: None)
    assert set(keep) <= set(res)
    assert 0 < sol["budget"] <= 2.0 and 0 < sol["hit_rate_all"] <= sol["hit_rate"] <= 1
    assert sol["from"]["recent"] > 0 and sol["age_s"] is not None and sol["age_s"] > 0
    assert sum(sol["from"].values()) == pytest.approx(sol["budget"] * 1536, abs=1)
    assert sol["auc_hits"] is not None and sol["auc_misses"] is not None


# ---- the precompute service -------------------------------------------------------------------------------
def test_service_scores_with_the_fms_published_version(tmp_path):
    from config import Config
    from trainer.publish import Publisher
    from trainer.solaris import PrecomputeService

    cfg = Config(data_dir=str(tmp_path), solaris=SolarisConfig(budget=2.0, neighbours=0))
    svc = PrecomputeService(cfg, str(tmp_path / "fm"), poll_s=0.0)
    imps = _targeted_stream(400, users=10)
    assert svc.handle(imps[:100], NOW) == []  # no FM version yet: requests observed, nothing computed
    assert svc.stats()["solaris_requests_without_fm"] == 100
    fm = Learner(_tcfg(role="fm"))
    exs = [schema.Example(example_id=i.event_id, impression=i, click=n % 2, conversion=0) for n, i in enumerate(imps)]
    fm.train_step(featurize(exs[:64], fm.tcfg))
    Publisher(tmp_path / "fm").publish(fm, examples_trained=64)
    recs = svc.handle(imps[100:200], NOW + 1000)
    n = sum(len(r.user_ids) for r in recs)
    assert 0 < n <= 2 * 100 and all(r.model_version == 1 and r.ts == NOW + 1000 for r in recs)
    # what it published is the FM's prediction of the pair at the user's latest context
    latest = {i.user_id: i for i in imps[:200]}
    r = recs[0]
    u, a = r.user_ids[0], r.ad_ids[0]
    ad = next(i for i in reversed(imps[:200]) if i.ad_id == a)
    pc, pv = score_pairs(fm, [pair_impression(latest[u], ad)])
    assert r.p_click[0] == pytest.approx(float(pc[0]), rel=1e-5)
    # the service's mirror: later requests of these users hit what it published
    svc.handle(imps[200:400], NOW + 2000)
    st = svc.stats()
    assert st["solaris_hit_rate"] > 0.3 and st["solaris_pairs_computed"] <= 2 * 300
    assert st["solaris_fm_version"] == 1 and 0 < st["solaris_budget_used"] <= 2


# ---- precompute service (a process, SIGKILLed mid-stream) -> broker -> VM trainer -------------------------
def test_vm_reads_what_the_service_published_and_trains_on_through_its_sigkill(cfg, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from config import replace
    from streams.bus import kafka_io
    from tests.conftest import read_topics
    from trainer.loop import Trainer
    from trainer.publish import Publisher
    from trainer.solaris import STEP

    cfg = replace(cfg, topics={"solaris_pairs": cfg.topics.examples + "_solaris"},
                  solaris={"budget": 2.0, "neighbours": 0})
    bs = cfg.kafka.bootstrap_servers
    kafka_io.ensure_topics(bs, cfg.topics.all(), cfg.topics.partitions)
    now = int(time.time() * 1000)
    imps = [msgspec.structs.replace(i, ts=now - 60_000 + 10 * n) for n, i in enumerate(_targeted_stream(600, users=30))]
    exs = [schema.Example(example_id=i.event_id, impression=i, click=int(n % 4 == 0), conversion=0, emitted_ts=now)
           for n, i in enumerate(imps)]
    fm = Learner(_tcfg(role="fm"))
    fm.train_step(featurize(exs[:128], fm.tcfg))
    Publisher(tmp_path / "models" / "fm").publish(fm, examples_trained=128)  # <models_dir>/fm: the default
    prod = kafka_io.make_producer(bs)

    def produce(topic, recs):
        for r in recs:
            kafka_io.produce(prod, topic, schema.encode(r), key=schema.user_key(r if topic == cfg.topics.impressions
                                                                                 else r.impression))
        prod.flush()

    config_path = tmp_path / "streamrec.yaml"
    config_path.write_text(yaml.safe_dump(msgspec.to_builtins(cfg)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STREAMREC_", "MALLOC_"))}
    root = Path(__file__).resolve().parents[1]

    def service(*args):
        return subprocess.Popen([sys.executable, "-m", "deploy.cli", "--config", str(config_path), "precompute",
                                 *args], cwd=root, env=env, stdout=open(tmp_path / "svc.log", "ab"),
                                stderr=subprocess.STDOUT)

    def pairs():
        return [schema.decode(m.value(), schema.SolarisPairs) for m in read_topics(cfg, cfg.topics.solaris_pairs, 5)]

    # the first half of the requests; the service publishes pairs, then is SIGKILLed
    produce(cfg.topics.impressions, imps[:300])
    svc = service()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not pairs():
        time.sleep(0.2)
    svc.send_signal(signal.SIGKILL)
    svc.wait()
    first = pairs()
    assert first, (tmp_path / "svc.log").read_text()[-2000:]
    # a bad record on the topic: the VM dead-letters it
    kafka_io.produce(prod, cfg.topics.solaris_pairs, schema.encode(_rec(p_click=[1.5, 0.2], ts=now)))
    # the service is down: the VM trains on, reading what was published
    produce(cfg.topics.impressions, imps[300:])
    produce(cfg.topics.examples, exs)
    vm_trainer = {**msgspec.to_builtins(_tcfg(solaris=True)), "checkpoint_dir": str(tmp_path / "vm"),
                  "checkpoint_every_s": 3600.0}
    vm = Trainer(replace(cfg, trainer=vm_trainer), resume=False)
    vm.solaris.start()
    cache = vm.solaris.cache
    want = sum(len(r.user_ids) for r in first)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (cache.counters["written"] + cache.counters["older_ignored"] < want
                                           or cache.counters["dead_letters"] < 1):
        time.sleep(0.05)
    assert vm.run(idle_exit_s=1.0)["examples_trained"] == 600 and vm.counters["duplicates"] == 0
    st = vm.solaris.stats()
    assert st["solaris_lookups"] == 600 and st["solaris_hits"] > 0 and st["solaris_dead_letters"] == 1
    # a hit reads exactly what the service published for the pair
    last = {}
    for r in first:
        for j, (u, a) in enumerate(zip(r.user_ids, r.ad_ids)):
            if r.ts >= last.get((u, a), (0,))[0]:
                last[(u, a)] = (r.ts, r.p_click[j], r.p_conversion[j])
    u, a = next(iter(last))
    got = vm.learner.solaris_view.features_of([_imp(0, u, a, now)], now_ms=last[(u, a)][0] + 1000)
    assert got[0].tolist() == pair_logits(np.array([last[(u, a)][1]]), np.array([last[(u, a)][2]]),
                                          np.array([True]))[0].tolist()
    dls = [schema.decode(m.value(), schema.DeadLetter) for m in read_topics(cfg, cfg.topics.dead_letters)]
    assert [d.step for d in dls] == [STEP] and "outside [0, 1]" in dls[0].reason
    # restarted, the service goes on from its committed offsets: the rest of the requests get pairs
    svc = service("--idle-exit", "3")
    assert svc.wait(timeout=120) == 0, (tmp_path / "svc.log").read_text()[-2000:]
    later = [r for r in pairs() if r.ts > max(x.ts for x in first)]
    assert later and {u for r in later for u in r.user_ids} <= {i.user_id for i in imps}
    assert "precompute:" in (tmp_path / "svc.log").read_text()


def test_generator_targeting_world():
    from streams.sources.generate import GeneratorConfig, simulate

    base = dict(n_impressions=3000, seed=5, n_users=100, n_ads=200, ad_churn=0.0)
    plain = simulate(GeneratorConfig(**base)).truth
    tgt = simulate(GeneratorConfig(**base, targeting=3, targeting_churn=0.0)).truth
    u, a = tgt.column("user_id").to_numpy(), tgt.column("ad_id").to_numpy()
    per_user = {x: len(set(a[u == x])) for x in set(u.tolist())}
    assert max(per_user.values()) <= 3 and np.mean([v == 3 for v in per_user.values()]) > 0.3
    # its own random stream: everything but the ads is drawn as without targeting
    for col in ("user_id", "ts", "domain"):
        assert tgt.column(col).to_pylist() == plain.column(col).to_pylist(), col
    assert (plain.column("ad_id").to_numpy() != a).mean() > 0.5
    churn = simulate(GeneratorConfig(**base, targeting=3, targeting_churn=0.5)).truth
    cu, ca = churn.column("user_id").to_numpy(), churn.column("ad_id").to_numpy()
    assert max(len(set(ca[cu == x])) for x in set(cu.tolist())) > 3  # the set changes
