"""Semantic IDs and cold start (issue 18): the generator's ad content, the codebook (stable across refresh,
new ads coded at birth), prefix tokens as features, checkpoint round trip, bench coldstart on a tiny stream."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time

import msgspec
import numpy as np
import pytest

from config import TrainerConfig
from embedding_store.semantic_ids import TOKEN_SHIFT, SemanticIdConfig, SemanticIds, _match
from streams import schema
from streams.sources.generate import GeneratorConfig, ad_content, simulate
from streams.sources.scenarios import ScenarioConfig
from trainer.features import featurize, table_names


@pytest.fixture(scope="module")
def content():
    """A surge world's ad content: 400 regular ads and 80 surge ads."""
    sim = simulate(GeneratorConfig(n_impressions=500, seed=4, n_ads=400, n_users=200,
                                   scenario=ScenarioConfig(name="new-ad-surge", surge_ads=0.2)))
    return sim, ad_content(sim)


def test_ad_content_reflects_the_hidden_world(content):
    sim, c = content
    assert c.content.shape == (480, 32) and c.category.shape == (480, 2)
    assert c.surge.sum() == 80 and (c.birth_ts[c.surge] > sim.config.start_ts).all()
    assert (c.category[:, 1] // 4 == c.category[:, 0]).all()  # the path is nested
    again = ad_content(sim)
    assert np.array_equal(again.content, c.content) and np.array_equal(again.category, c.category)
    # an ad's nearest neighbour by content shares its top category far more often than chance (1/8)
    x = c.content / np.linalg.norm(c.content, axis=1, keepdims=True)
    sim_ = x @ x.T
    np.fill_diagonal(sim_, -2)
    nn = sim_.argmax(1)
    assert (c.category[nn, 0] == c.category[:, 0]).mean() > 0.5
    # the generator's traffic is unchanged by the content (its own random stream) and emits no creatives by default
    plain = simulate(msgspec.structs.replace(sim.config, content_dim=8, content_noise=2.0))
    assert [r.event_id for r in plain.records] == [r.event_id for r in sim.records]


def _fitted(c, n_old: int, **kw) -> SemanticIds:
    s = SemanticIds(SemanticIdConfig(levels=3, codes=8, fit_min_ads=n_old, refresh_growth=0, **kw))
    s.add(c.ad_ids[:n_old], c.content[:n_old])
    return s


def test_new_ads_coded_at_birth(content):
    _, c = content
    s = SemanticIds(SemanticIdConfig(levels=3, codes=8, fit_min_ads=300, refresh_growth=0))
    early = s.add(c.ad_ids[:200], c.content[:200])
    assert (early == -1).all() and not s.fitted  # buffered until fit_min_ads ads have content
    s.add(c.ad_ids[200:400], c.content[200:400])
    assert s.fitted and (s.codes_of(c.ad_ids[:400])[0] >= 0).all()  # the buffered ones are coded by the fit
    born = s.add(c.ad_ids[400:], c.content[400:])  # the surge: coded the moment their creatives arrive
    assert np.array_equal(born, s.assign(c.content[400:])) and (born >= 0).all()
    assert s.stats["coded_at_birth"] == 80
    # known ads keep their code whatever content comes again; an unknown id has none
    again = s.add(c.ad_ids[400:410], np.zeros((10, 32), np.float32))
    assert np.array_equal(again, born[:10])
    codes, known = s.codes_of(np.array([10_000]))
    assert not known[0] and (codes == -1).all()
    with pytest.raises(ValueError, match="dims"):
        s.add(np.array([9999]), np.zeros((1, 5), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        s.add(np.array([9999]), np.full((1, 32), np.nan, np.float32))


def test_codes_stable_across_refresh(content):
    _, c = content
    s = _fitted(c, 400)
    before = s.codes_of(c.ad_ids[:400])[0]
    cent = s.centroids.copy()
    assert s.refresh() <= 0.05 * 400  # the same catalogue: (nearly) every ad keeps its code
    assert np.array_equal(s.codes_of(c.ad_ids[:400])[0][:, 0], before[:, 0])
    # the catalogue grows by a fifth (the surge): a refresh moves centroids, but few ads change code, and
    # code j still means "near the old centroid j" (warm start + Hungarian matching)
    s.add(c.ad_ids[400:], c.content[400:])
    changed = s.refresh()
    assert changed <= 0.08 * 400, changed
    assert s.version == 3 and s.stats["changed_last_refresh"] == changed
    d_same = np.linalg.norm(s.centroids[0] - cent[0], axis=1)
    d_other = np.linalg.norm(s.centroids[0][:, None] - cent[0][None], axis=2).min(1)
    assert np.allclose(d_same, d_other)  # each level-1 code's nearest old centroid is its own old one
    # without keeping codes (keep_margin 0: every ad to its new best code) more ads would move
    s0 = _fitted(c, 400, keep_margin=0.0)
    s0.add(c.ad_ids[400:], c.content[400:])
    assert s0.refresh() >= changed


def test_hungarian_matching_undoes_a_renumbering():
    rng = np.random.default_rng(1)
    old = rng.normal(0, 1, (16, 6)).astype(np.float32)
    perm = rng.permutation(16)
    new = old[perm] + rng.normal(0, 0.01, old.shape).astype(np.float32)
    assert np.allclose(_match(new, old), old, atol=0.05)


def test_prefix_tokens():
    s = SemanticIds(SemanticIdConfig(levels=3, codes=16))
    t = s.tokens(np.array([[1, 2, 3], [1, 2, 4], [1, 5, 3], [2, 2, 3]]))
    assert (t[:, 0] >> np.uint64(TOKEN_SHIFT)).tolist() == [1] * 4 and (t[:, 2] >> np.uint64(TOKEN_SHIFT)).tolist() == [3] * 4
    assert t[0, 0] == t[1, 0] == t[2, 0] != t[3, 0]  # level 1 shared by the first three
    assert t[0, 1] == t[1, 1] != t[2, 1]  # levels 1-2 shared by the first two
    assert len({int(x) for x in t[:, 2]}) == 4  # full codes differ
    assert len({int(x) for x in t.ravel()}) == 4 + 3 + 2 - 1 + 1  # no token of one length equals another's
    assert (t < np.uint64(2 ** 63)).all()


def _examples(ad_ids):
    out = []
    for i, a in enumerate(ad_ids):
        imp = schema.Impression(event_id=f"i{i}", ts=1_700_000_000_000 + i, user_id=7 + i, ad_id=int(a),
                                campaign_id=1, advertiser_id=1, domain="feed", cat=[5], dense=[1.0], history=[1, 2])
        out.append(schema.Example(example_id=f"e{i}", impression=imp, click=i % 2, conversion=0))
    return out


@pytest.mark.parametrize("mode", ["sid", "sid_ngram", "hash+sid_ngram"])
def test_features_read_the_codes(content, mode):
    _, c = content
    s = _fitted(c, 400)
    tc = TrainerConfig(cat_slots=1, dense_dim=2, history_len=2, hash_buckets=1000, ad_id_features=mode,
                       sid_levels=3, sid_codes=8)
    exs = _examples([1, 2, 99_999])  # two coded ads, one without content (falls back to its raw id)
    fb = featurize(exs, tc, sids=s)
    base = featurize(exs, TrainerConfig(cat_slots=1, dense_dim=2, history_len=2, hash_buckets=1000))
    b, t_ad = 3, 1
    names = table_names(tc)
    assert fb.num_tables == len(names) == (10 if mode == "hash+sid_ngram" else 9)
    lens = np.diff(fb.offsets)
    if mode == "hash+sid_ngram":
        assert names[-1] == "ad_sid" and lens[-b:].tolist() == [3, 3, 0]
        assert np.array_equal(fb.indices[:len(base.indices)], base.indices)  # every other bag as with hashing
    elif mode == "sid_ngram":
        assert lens[t_ad * b:(t_ad + 1) * b].tolist() == [3, 3, 1]
    else:
        assert lens.tolist() == np.diff(base.offsets).tolist()
        assert fb.indices[t_ad * b + 2] == base.indices[t_ad * b + 2]  # unknown ad: its hashed raw id
        assert fb.indices[t_ad * b] != base.indices[t_ad * b]
    # ads of the same level-1 code share that token's row
    same = np.flatnonzero(s.codes_of(c.ad_ids[:400])[0][:, 0] == s.codes_of(c.ad_ids[:1])[0][0, 0])
    if mode == "sid_ngram" and len(same) > 1:
        fb2 = featurize(_examples([1, int(c.ad_ids[same[1]])]), tc, sids=s)
        o = fb2.offsets
        assert fb2.indices[o[2]] == fb2.indices[o[3]]
    # without a SemanticIds every ad falls back to its raw id
    assert featurize(exs, tc).indices.shape[0] == base.indices.shape[0]


def test_checkpoint_round_trip(content, tmp_path):
    from trainer import checkpoint
    from trainer.model import Learner

    _, c = content
    tc = TrainerConfig(cat_slots=1, dense_dim=2, history_len=2, hash_buckets=500, embedding_dim=4, device="cpu",
                       backend="torch", user_model=False, ad_id_features="sid_ngram", sid_levels=2, sid_codes=8)
    lr = Learner(tc)
    lr.semantic_ids.add(c.ad_ids[:300], c.content[:300])
    exs = _examples(c.ad_ids[:64])
    lr.train_step(featurize(exs, tc, sids=lr.semantic_ids))
    path = checkpoint.save(tmp_path, lr.state(), 1)
    lr2 = Learner(tc)
    assert len(lr2.semantic_ids) == 0
    lr2.load_state(checkpoint.load(path))  # weights_only: the codebook state is tensors and numbers
    s1, s2 = lr.semantic_ids, lr2.semantic_ids
    assert np.array_equal(s1.centroids, s2.centroids) and s2.version == s1.version
    assert np.array_equal(s1.codes_of(c.ad_ids)[0], s2.codes_of(c.ad_ids)[0])
    p1 = lr.score(featurize(exs, tc, sids=s1))[0]
    p2 = lr2.score(featurize(exs, tc, sids=s2))[0]
    assert np.allclose(p1, p2)
    # a new ad born after the restart gets the code it would have got before
    assert np.array_equal(s1.add(c.ad_ids[300:301], c.content[300:301]), s2.add(c.ad_ids[300:301], c.content[300:301]))


def test_bench_coldstart_on_a_tiny_stream(monkeypatch):
    from benchmarks import coldstart

    out = io.StringIO()
    monkeypatch.setattr(sys, "argv", ["coldstart.py", "--n", "1200", "--ads", "100", "--variants",
                                      "hash,sid_ngram", "--max-imps", "20"])
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert coldstart.main() == 0
    lines = out.getvalue().strip().splitlines()
    res = json.loads(lines[-1])
    assert res["bench"] == "coldstart" and res["variant"] == "sid_ngram" and res["n"] == 1200
    assert res["new_impressions"] > 0 and res["warm_impressions"] > 0
    assert set(res["new_auc"]) == {"oracle", "hash", "sid_ngram"}
    assert 0.5 < res["new_auc"]["oracle"] <= 1.0
    assert res["value"] == pytest.approx(100 * (res["new_auc"]["sid_ngram"] - res["new_auc"]["hash"]), abs=0.01)
    assert res["sid_coded_at_birth"] > 0  # ads born during the run were coded from their content
    assert any(line.startswith("sid_ngram") and "new ads" in line for line in lines)


def test_published_versions_carry_the_codebook(content, tmp_path):
    """Full and delta versions carry the semantic IDs; serving scores with the codes the trainer used."""
    from serving.batcher import score
    from trainer.model import Learner
    from trainer.publish import Publisher, VersionStore

    _, c = content
    tc = TrainerConfig(cat_slots=1, dense_dim=2, history_len=2, hash_buckets=500, embedding_dim=4, device="cpu",
                       backend="torch", user_model=False, ad_id_features="hash+sid_ngram", sid_levels=2, sid_codes=8)
    lr = Learner(tc)
    lr.semantic_ids.add(c.ad_ids[:300], c.content[:300])
    lr.train_step(featurize(_examples(c.ad_ids[:64]), tc, sids=lr.semantic_ids))
    pub = Publisher(tmp_path, full_every=10)
    pub.publish(lr)
    store = VersionStore(tmp_path)
    v1 = store.load()
    assert np.array_equal(v1.semantic_ids.codes_of(c.ad_ids[:300])[0], lr.semantic_ids.codes_of(c.ad_ids[:300])[0])
    lr.train_step(featurize(_examples(c.ad_ids[64:128]), tc, sids=lr.semantic_ids))
    pub.publish(lr)  # a delta, the codebook unchanged: no semantic_ids.pt, the previous one carries on
    assert not (tmp_path / "v000000000002" / "semantic_ids.pt").exists()
    lr.semantic_ids.add(c.ad_ids[400:420], c.content[400:420])  # new ads born, coded
    pub.publish(lr)  # a delta with the new codes
    v3 = store.advance(v1)
    assert v3.seq == 3 and v3.semantic_ids.codes_of(c.ad_ids[400:420])[1].all()
    assert not v1.semantic_ids.codes_of(c.ad_ids[400:420])[1].any()  # the served version was not mutated
    imps = [e.impression for e in _examples(c.ad_ids[400:420])]
    served = score(v3, imps)[0]
    assert np.allclose(served, lr.score(featurize(_examples(c.ad_ids[400:420]), tc, sids=lr.semantic_ids))[0],
                       atol=1e-6)


def test_trainer_codes_ads_from_the_ads_topic(cfg, tmp_path):
    """The live path: the generator's creatives on topics.ads, a trainer with sid_ngram codes every ad from them
    (bad records -> dead letters), trains on the examples, checkpoints the codes and gets them back on resume."""
    from benchmarks._simulated import example_stream
    from config import replace
    from streams.bus import kafka_io
    from streams.sources.replay import produce
    from tests.conftest import read_topics
    from trainer.creatives import STEP
    from trainer.loop import Trainer
    from trainer.telemetry import service_stats

    cfg = replace(cfg, topics={"ads": cfg.topics.examples + "_ads"},
                  trainer={"device": "cpu", "backend": "torch", "hash_buckets": 2000, "cat_slots": 1, "dense_dim": 2,
                           "history_len": 2, "embedding_dim": 4, "user_model": False, "batch_size": 128,
                           "checkpoint_every_s": 3600.0, "ad_id_features": "sid_ngram", "sid_levels": 2,
                           "sid_codes": 8})
    kafka_io.ensure_topics(cfg.kafka.bootstrap_servers, cfg.topics.all(), cfg.topics.partitions)
    sim = simulate(GeneratorConfig(n_impressions=600, seed=5, n_ads=300, n_users=100, emit_creatives=True))
    creatives = [r for r in sim.records if isinstance(r, schema.AdCreative)]
    assert len(creatives) == sim.counts()["creative"] == 300
    bad = schema.AdCreative(ad_id=12345, ts=1, content=[])  # no content: refused with a reason
    produce(cfg, [*creatives, bad], progress=False, watermark=False)
    prod = kafka_io.make_producer(cfg.kafka.bootstrap_servers)
    exs = example_stream(sim, "oracle", elapsed_s=0)
    for ex in exs:
        kafka_io.produce(prod, cfg.topics.examples, schema.encode(ex), key=schema.user_key(ex.impression))
    prod.flush()

    tr = Trainer(cfg, resume=False)
    feed = tr.creatives.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and feed.counts["creatives_read"] + feed.counts["creatives_refused"] < 301:
        time.sleep(0.05)
    assert feed.counts == {"creatives_read": 300, "creatives_refused": 1, "creatives_applied": 0}
    assert tr.run(idle_exit_s=1.0)["examples_trained"] == 600
    sids = tr.learner.semantic_ids
    codes, known = sids.codes_of(np.array([c.ad_id for c in creatives]), count=False)
    assert known.all() and sids.version == 1  # one codebook, fitted once 256 ads had content
    assert np.array_equal(codes, sids.assign(np.array([c.content for c in creatives], np.float32)))
    values = service_stats(tr, tr._stats).values
    assert values["creatives_applied"] == 300 and values["semantic_ids_ads"] == 300
    assert values["semantic_ids_unknown_lookups"] == 0  # every ad had its code before its impressions
    dls = [schema.decode(m.value(), schema.DeadLetter) for m in read_topics(cfg, cfg.topics.dead_letters)]
    mine = [d for d in dls if d.step == STEP]
    assert len(mine) == 1 and "content: 0 values" in mine[0].reason and mine[0].topic == cfg.topics.ads

    again = Trainer(cfg, resume=True)  # the checkpoint written at the end of run() holds the codes
    assert np.array_equal(again.learner.semantic_ids.codes_of(np.array([c.ad_id for c in creatives]))[0], codes)


@pytest.mark.parametrize("backend, mode", [("fiited", "hash+sid_ngram"), ("fbgemm", "sid_ngram")])
def test_prefix_tables_on_the_fbgemm_backends(content, backend, mode):
    """The ad_sid table and the variable-length ad_id bags go through fbgemm's TBE and the FIITED store."""
    from trainer.embeddings import fbgemm_available
    from trainer.model import Learner

    if not fbgemm_available("cpu"):
        pytest.skip("fbgemm_gpu does not load here")
    _, c = content
    tc = TrainerConfig(cat_slots=1, dense_dim=2, history_len=2, hash_buckets=500, embedding_dim=8, device="cpu",
                       backend=backend, user_model=False, ad_id_features=mode, sid_levels=2, sid_codes=8)
    lr = Learner(tc)
    lr.semantic_ids.add(c.ad_ids[:300], c.content[:300])
    exs = _examples(c.ad_ids[:64])
    fb = featurize(exs, tc, sids=lr.semantic_ids)
    before = lr.score(fb)[0]
    for _ in range(3):
        lr.train_step(fb)
    after = lr.score(fb)[0]
    assert lr.model.num_tables == len(table_names(tc)) and np.isfinite(after).all()
    assert not np.allclose(before, after)  # it learned through the prefix rows


def test_semantic_ids_panel(store):
    from dashboards import queries as q
    from dashboards.definitions import DASHBOARDS
    from dashboards.sink import stats_rows

    assert "semantic_ids" in {p.id for p in DASHBOARDS["overview"].panels}
    now = int(time.time() * 1000)
    store.insert("service_stats", stats_rows([
        schema.ServiceStats("trainer", now - 3_000, {"semantic_ids_ads": 100.0, "semantic_ids_lookups": 400.0,
                                                     "semantic_ids_unknown_lookups": 40.0}, "main"),
        schema.ServiceStats("trainer", now - 1_000, {"semantic_ids_ads": 120.0, "semantic_ids_coded_at_birth": 20.0,
                                                     "semantic_ids_refreshes": 0.0, "semantic_ids_lookups": 800.0,
                                                     "semantic_ids_unknown_lookups": 60.0}, "main")]))
    rows = store.query(q.render(q.SEMANTIC_IDS, "live"), q.live_parameters(10)).rows
    last = {}
    for t, series, v in rows:
        last[series] = v  # ordered by time: the newest bucket wins
    assert last["ads coded, main"] == 120 and last["coded at birth, main"] == 20
    assert last["uncoded lookups %, main"] == pytest.approx(7.5)


def test_category_path_of_public_formats(tmp_path):
    """trainer.sid_path: the ad's semantic ID is the category path its impressions carry (Taobao: cate_id,
    brand in cat_1, cat_2), no codebook; prefix tokens shared by ads of one category, and one brand in it."""
    from trainer.model import Learner
    from trainer.publish import Publisher, VersionStore

    tc = TrainerConfig(cat_slots=3, dense_dim=1, history_len=0, hash_buckets=1000, embedding_dim=4, device="cpu",
                       backend="torch", user_model=False, ad_id_features="sid_ngram", sid_path=("cat_1", "cat_2"))
    paths = {1: [9, 70, 500], 2: [9, 70, 500], 3: [9, 70, 501], 4: [9, 71, 500]}  # ad -> (pid, cate_id, brand)
    exs = []
    for a, cat in paths.items():
        imp = schema.Impression(event_id=f"i{a}", ts=1_700_000_000_000, user_id=1, ad_id=a, campaign_id=1,
                                advertiser_id=1, domain="display", cat=cat, dense=[0.0])
        exs.append(schema.Example(example_id=f"e{a}", impression=imp, click=a % 2, conversion=0))
    fb = featurize(exs, tc)
    o, b = fb.offsets, 4
    bag = [fb.indices[o[b + i]:o[b + i + 1]].tolist() for i in range(4)]  # the ad_id table's bags
    assert all(len(x) == 2 for x in bag)
    assert bag[0] == bag[1]  # same category and brand: the same rows, whatever the ad id
    assert bag[0][0] == bag[2][0] and bag[0][1] != bag[2][1]  # same category, another brand
    assert bag[0][0] != bag[3][0]  # another category
    lr = Learner(tc)
    assert lr.semantic_ids is None  # nothing to code: the impressions carry it
    lr.train_step(fb)
    Publisher(tmp_path).publish(lr)  # no semantic_ids.pt needed
    v = VersionStore(tmp_path).load()
    assert v.semantic_ids is None and v.tcfg.sid_path == ("cat_1", "cat_2")
    with pytest.raises(ValueError, match="sid_path: unknown"):
        featurize(exs, msgspec.structs.replace(tc, sid_path=("brand",)))
