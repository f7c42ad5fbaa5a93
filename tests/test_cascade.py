"""The multi-task early-stage ranker and the cascade (trainer/early_stage.py, serving.cascade_k, bench cascade)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch

from benchmarks._simulated import example_stream, impressions
from config import TrainerConfig, load_config
from streams import schema
from streams.sources.generate import GeneratorConfig, TruthParams, simulate
from trainer.early_stage import EarlyStage, cascade_recall, rank_impressions
from trainer.features import featurize, impression_batch
from trainer.model import Learner

ROOT = Path(__file__).resolve().parents[1]
TRUTH = TruthParams(base_ctr={"feed": 0.2, "stories": 0.15, "video": 0.12, "search": 0.25},
                    base_cvr={"feed": 0.2, "stories": 0.15, "video": 0.15, "search": 0.25})
TC = TrainerConfig(device="cpu", user_model=False, hash_buckets=5000, batch_size=256, early_stage=True,
                   early_stage_buckets=2000)


def _train(tc: TrainerConfig, n: int, seed: int = 3):
    """A final ranker and both early stages over a small generated stream, as the trainer loop feeds them."""
    torch.manual_seed(0)
    sim = simulate(GeneratorConfig(n_impressions=n, seed=seed, n_users=300, n_ads=300, truth=TRUTH))
    exs = example_stream(sim, "oracle", elapsed_s=0)
    final = Learner(tc)
    multi, single = EarlyStage(tc, "multi"), EarlyStage(tc, "click")
    for i in range(0, len(exs), tc.batch_size):
        chunk = exs[i:i + tc.batch_size]
        fb = featurize(chunk, tc)
        r = final.train_step(fb)
        multi.step_beside(final, fb, [e.impression for e in chunk], r.p_click, r.p_conversion)
        single.step_beside(final, fb, [e.impression for e in chunk], r.p_click, r.p_conversion)
    return sim, final, multi, single


@pytest.fixture(scope="module")
def trained():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield _train(TC, 12_000)
    finally:
        torch.set_num_threads(threads)


def _requests(sim, n_req: int, n_cand: int, seed: int = 5) -> list[list[schema.Impression]]:
    imps = impressions(sim)
    ads = {i.ad_id: (i.campaign_id, i.advertiser_id) for i in imps}
    ad_ids = np.array(sorted(ads))
    rng = np.random.default_rng(seed)
    out = []
    for k in rng.choice(len(imps), n_req, replace=False).tolist():
        u = imps[k]
        out.append([msgspec.structs.replace(u, event_id=f"r{k}.c{j}", ad_id=int(a), campaign_id=ads[int(a)][0],
                                            advertiser_id=ads[int(a)][1], position=0)
                    for j, a in enumerate(rng.choice(ad_ids, n_cand, replace=False).tolist())])
    return out


def _final_logits(final: Learner, imps) -> np.ndarray:
    with torch.no_grad():
        l_ctr, _ = final.model.logits(impression_batch(imps, final.tcfg, final.device))
    return l_ctr.numpy()


# -- recall against the exact reference ------------------------------------------------------------------------
def test_recall_is_measured_against_the_final_rankers_exact_top():
    rng = np.random.default_rng(0)
    f = rng.normal(size=1000)
    assert cascade_recall(f, f, 10, 10) == 1.0  # the final itself as early stage keeps its whole top
    assert cascade_recall(f, -f, 10, 100) == 0.0  # the reversed order keeps none of it
    # a brute-force reference: which of the exact top 10 (sorted by hand) are among the early stage's top 100
    e = f + rng.normal(scale=1.0, size=1000)
    exact = sorted(range(1000), key=lambda i: -f[i])[:10]
    kept = set(sorted(range(1000), key=lambda i: -e[i])[:100])
    want = sum(i in kept for i in exact) / 10
    assert cascade_recall(f, e, 10, 100) == want and 0 < want < 1
    assert cascade_recall(f, rng.normal(size=1000), 10, 1000) == 1.0  # keeping everything keeps the top


def test_multi_task_learns_the_final_rankers_scores(trained):
    sim, final, multi, single = trained
    assert multi.stats["pair_rows"] == 4 * multi.stats["rows"] > 0 and single.stats["pair_rows"] == 0
    corr, rec = {"multi": [], "single": []}, {"multi": [], "single": []}
    for cands in _requests(sim, 20, 200):
        lf = _final_logits(final, cands)
        for name, es in (("multi", multi), ("single", single)):
            le = rank_impressions(es.model, TC, cands)
            corr[name].append(np.corrcoef(lf, le)[0, 1])
            rec[name].append(cascade_recall(lf, le, 5, 20))
    c = {k: float(np.mean(v)) for k, v in corr.items()}
    r = {k: float(np.mean(v)) for k, v in rec.items()}
    # the multi-task stage orders a request's candidates as the final does: its disagreement with the final
    # (1 - correlation) is under half the click model's (measured 0.03 against 0.11), and it keeps the final's top
    assert 1 - c["multi"] < 0.5 * (1 - c["single"]), c
    assert r["multi"] >= 0.8, r


def test_rank_scores_a_request_like_the_batch_path(trained):
    """The cascade's fast path (user tower once, ad tower per candidate) equals scoring every row whole."""
    from trainer.early_stage import EarlyBatch
    from trainer.features import featurize_impressions

    _, _, multi, _ = trained
    cands = _requests(trained[0], 1, 50)[0]
    fast = rank_impressions(multi.model, TC, cands)
    whole = multi.model.score(EarlyBatch(featurize_impressions(cands, TC), TC, multi.model.buckets, multi.device))
    np.testing.assert_allclose(fast, whole, rtol=1e-5, atol=1e-5)


def test_candidate_pairs_from_the_feature_arrays_equal_featurized_impressions(trained):
    """The fast path of step_beside (pairs built from the batch's arrays) equals featurizing the pairs."""
    from trainer.early_stage import pair_tables
    from trainer.features import featurize_impressions

    sim, _, multi, _ = trained
    chunk = example_stream(simulate(GeneratorConfig(n_impressions=40, seed=11, n_users=300, n_ads=300,
                                                    truth=TRUTH, history_len=3)), "oracle", elapsed_s=0)
    imps = [e.impression for e in chunk]
    fb = featurize(chunk, TC)
    k = TC.early_stage_pairs
    ads = multi.sample_ads(len(imps) * k)
    fast = pair_tables(fb, TC, k, *ads)
    slow = featurize_impressions(multi.pair_impressions(imps, ads), TC)
    for a, b in zip(fast, slow):
        np.testing.assert_array_equal(a, b)
    assert len(fast[3]) == len(imps) * k and len(set(ads[0].tolist())) > 10
    # and the final ranker's scores of them, with the user model's features (per user and ad) read alike
    from trainer.users.vectors import UserVectors

    tc = msgspec.structs.replace(TC, user_model=True, user_dim=4)
    final = Learner(tc)
    rng = np.random.default_rng(2)
    final.user_view = UserVectors(4, torch.from_numpy(rng.normal(size=(301, 4)).astype(np.float32)))
    final.user_view.update(np.arange(1, 301), rng.normal(size=(300, 4)).astype(np.float32))
    fb = featurize(chunk, tc, final.user_view)
    f_parts, f_pc, f_pv = multi.score_pairs(final, fb, imps, ads)
    s_parts, s_pc, s_pv = multi.score_pairs(final, fb, imps, ads, fast=False)
    np.testing.assert_array_equal(f_pc, s_pc)
    np.testing.assert_array_equal(f_pv, s_pv)
    assert f_pc.std() > 0


# -- checkpoints and published versions -------------------------------------------------------------------------
def test_checkpoint_round_trip_continues_exactly(trained, tmp_path):
    from trainer import checkpoint

    sim, final, multi, _ = trained
    exs = example_stream(simulate(GeneratorConfig(n_impressions=512, seed=9, n_users=300, n_ads=300, truth=TRUTH)),
                         "oracle", elapsed_s=0)
    path = checkpoint.save(tmp_path, {"early_stage": multi.state()}, seq=1)
    _, st = checkpoint.load_latest(tmp_path)
    twin = EarlyStage(TC, "multi")
    twin.load_state(st["early_stage"])
    cands = _requests(sim, 1, 100)[0]
    np.testing.assert_array_equal(rank_impressions(twin.model, TC, cands), rank_impressions(multi.model, TC, cands))
    assert twin.pool == multi.pool and twin.steps == multi.steps
    fb = featurize(exs[:256], TC)
    pc, pv = final.score(fb)
    # the same next step (pairs drawn from the restored pool and rng) gives the same weights
    for es in (multi, twin):
        es.step_beside(final, fb, [e.impression for e in exs[:256]], pc, pv)
    np.testing.assert_array_equal(rank_impressions(twin.model, TC, cands), rank_impressions(multi.model, TC, cands))
    with pytest.raises(ValueError, match="tasks"):
        EarlyStage(TC, "click").load_state(st["early_stage"])
    assert path.exists()


def test_published_versions_carry_the_early_stage_full_and_delta(tmp_path):
    from trainer.publish import Publisher, VersionStore

    tc = msgspec.structs.replace(TC, hash_buckets=1000, early_stage_buckets=500)
    sim, final, multi, _ = _train(tc, 1024, seed=4)
    final.early_stage = multi
    pub = Publisher(tmp_path, full_every=10)
    cands = _requests(sim, 1, 60)[0]
    assert pub.publish(final).kind == "full"
    store = VersionStore(tmp_path)
    v1 = store.load()
    np.testing.assert_array_equal(rank_impressions(v1.early_stage, tc, cands), rank_impressions(multi.model, tc, cands))
    # train on, publish a delta: the served copy built from full + delta matches the trainer's early stage
    exs = example_stream(simulate(GeneratorConfig(n_impressions=512, seed=8, n_users=300, n_ads=300, truth=TRUTH)),
                         "oracle", elapsed_s=0)
    for i in range(0, 512, 256):
        fb = featurize(exs[i:i + 256], tc)
        r = final.train_step(fb)
        multi.step_beside(final, fb, [e.impression for e in exs[i:i + 256]], r.p_click, r.p_conversion)
    info = pub.publish(final)
    assert info.kind == "delta"
    v2 = store.advance(v1)
    assert v2.seq == 2 and v2.early_stage is not v1.early_stage
    np.testing.assert_array_equal(rank_impressions(v2.early_stage, tc, cands), rank_impressions(multi.model, tc, cands))
    np.testing.assert_array_equal(rank_impressions(store.load(2).early_stage, tc, cands),
                                  rank_impressions(multi.model, tc, cands))
    # the delta holds only the rows trained since: smaller than the full's early stage
    full_b = (tmp_path / "v000000000001" / "early_stage.pt").stat().st_size
    delta_b = (tmp_path / "v000000000002" / "early_stage.pt").stat().st_size
    assert delta_b < full_b / 2
    # the version served before keeps its own early stage (never mutated)
    assert not np.array_equal(rank_impressions(v1.early_stage, tc, cands), rank_impressions(v2.early_stage, tc, cands))


# -- the serving cascade ----------------------------------------------------------------------------------------
def test_serving_cascade_ranks_the_finals_order_within_the_early_top_k(trained, tmp_path):
    from serving.client import Client
    from serving.models import LocalModel, StaticStore
    from serving.service import RankingService, ServingServer

    sim, final, multi, _ = trained
    final.early_stage = multi
    u = impressions(sim)[7]
    ads = sorted({(i.ad_id, i.campaign_id, i.advertiser_id) for i in impressions(sim)})[:120]
    body = {"user_id": u.user_id, "domain": u.domain, "k": 5, "ts": u.ts,
            "context": {"device": u.device, "country": u.country, "dense": u.dense, "cat": u.cat,
                        "history": u.history},
            "candidates": [{"ad_id": a, "campaign_id": c, "advertiser_id": v} for a, c, v in ads]}
    cands = [msgspec.structs.replace(u, event_id=f"c{j}", ad_id=a, campaign_id=c, advertiser_id=v, position=0)
             for j, (a, c, v) in enumerate(ads)]
    lf = _final_logits(final, cands)
    le = rank_impressions(multi.model, TC, cands)
    k = 20
    kept = np.argsort(-le, kind="stable")[:k]
    want = [ads[i][0] for i in kept[np.argsort(-lf[kept], kind="stable")][:5]]
    exact = [ads[i][0] for i in np.argsort(-lf, kind="stable")[:5]]
    got = {}
    for cascade_k in (k, 0):
        cfg = load_config(env={}, data_dir=str(tmp_path), serving={"port": 0, "cascade_k": cascade_k})
        svc = RankingService(cfg, {"main": StaticStore(LocalModel.of(final))}, emit=False, feed=False)
        with ServingServer(cfg, svc) as srv, Client("127.0.0.1", srv.port) as c:
            status, res = c.rank(body)
        assert status == 200, res
        got[cascade_k] = [a["ad_id"] for a in res["ads"]]
        p = [a["p_click"] for a in res["ads"]]
        assert p == sorted(p, reverse=True)
        assert svc.batcher.cascaded == (1 if cascade_k else 0)
        assert svc.batcher.cascade_cut == (len(ads) - k if cascade_k else 0)
    assert got[k] == want  # the final's order over the early stage's top k
    assert got[0] == exact  # no cascade: the final over every candidate
    final.early_stage = None


# -- the benchmark ----------------------------------------------------------------------------------------------
def test_bench_cascade_on_a_tiny_stream():
    out = subprocess.run([sys.executable, "-m", "benchmarks.cascade", "--n", "6000", "--requests", "4",
                          "--candidates", "200", "--keep", "20", "--top", "5"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    res = json.loads(lines[-1])
    assert res["bench"] == "cascade" and res["candidates"] == 200 and res["keep"] == 20
    assert 0 <= res["value"] <= 1 and 0 <= res["baseline"] <= 1 and res["value"] == res["multi_task_recall"]
    assert res["cost_ratio"] > 0 and res["final_us_per_candidate"] > 0
    assert any(line.startswith("early stage, multi-task") for line in lines)


# -- beside the final ranker in the trainer loop (the real broker) -----------------------------------------------
def test_trainer_loop_trains_checkpoints_and_publishes_the_early_stage(cfg, tmp_path):
    from config import replace
    from streams.bus import kafka_io
    from tests.test_trainer_service import make_examples
    from trainer import checkpoint
    from trainer.loop import Trainer
    from trainer.publish import VersionStore
    from trainer.telemetry import Throughput, service_stats

    exs = make_examples(2000)
    prod = kafka_io.make_producer(cfg.kafka.bootstrap_servers)
    for ex in exs:
        kafka_io.produce(prod, cfg.topics.examples, schema.encode(ex), key=schema.user_key(ex.impression))
    assert prod.flush(30) == 0
    del prod
    root = tmp_path / "models" / "main"
    cfg = replace(cfg, trainer={"device": "cpu", "batch_size": 256, "hash_buckets": 5000, "user_model": False,
                                "early_stage": True, "early_stage_buckets": 1000, "publish_every_s": 1.0,
                                "checkpoint_dir": str(tmp_path / "ckpt")})
    svc = Trainer(cfg, resume=False, publish_dir=str(root))
    assert svc.run(idle_exit_s=1.0)["examples_trained"] == 2000
    es = svc.early
    assert es.stats["rows"] == 2000 and es.steps == svc.learner.steps and len(es.pool) > 100
    values = service_stats(svc, Throughput()).values
    assert values["early_stage_rows"] == 2000 and values["early_stage_pair_rows"] == 4 * 2000
    cands = [msgspec.structs.replace(exs[0].impression, ad_id=a, campaign_id=a // 3, advertiser_id=a // 15)
             for a in range(300)]
    want = rank_impressions(es.model, cfg.trainer, cands)
    # the newest published version (the shutdown one) serves exactly the trainer's early stage
    p = VersionStore(root).load()
    assert p.steps == svc.learner.steps and p.early_stage is not None
    np.testing.assert_array_equal(rank_impressions(p.early_stage, p.tcfg, cands), want)
    # the checkpoint holds it; a resumed trainer continues from it
    _, st = checkpoint.load_latest(tmp_path / "ckpt")
    assert st["early_stage"]["steps"] == svc.learner.steps
    again = Trainer(cfg, resume=True, publish_dir=str(root))
    assert again.early.steps == es.steps and again.early.pool == es.pool
    np.testing.assert_array_equal(rank_impressions(again.early.model, cfg.trainer, cands), want)
