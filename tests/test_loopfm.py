"""LoopFM: the FM's published user/ad vectors, the VM's store (versions, age, bounds, dead letters), the VM's
input block, and an FM trainer feeding a VM trainer through the real broker."""

from __future__ import annotations

import time

import msgspec
import numpy as np
import pytest
import torch

from config import TrainerConfig, replace
from embedding_store.fm_embeddings import STEP, FMEmbeddingStore
from streams import schema
from streams.bus import kafka_io
from tests.conftest import read_topics
from trainer.export import ExportError, feature_spec, serving_model
from trainer.features import featurize, hash_ids, impression_batch, stable_str_id, table_names
from trainer.loopfm import FMEmbeddingView, fm_embeddings, representation_dim
from trainer.model import USER_SIDE, Learner
from trainer.users.model import ad_rows
from trainer.users.vectors import UserVectors

NOW = 1_700_000_000_000


def make_examples(n: int, seed: int = 0, users: int = 200, ads: int = 60, ts: int | None = None) -> list[schema.Example]:
    """Click depends on a user x ad taste (users and ads have one of 4 types) and the ad."""
    rng = np.random.default_rng(seed)
    u = rng.integers(0, users, n)
    a = rng.integers(0, ads, n)
    logit = -1.0 + 2.0 * ((u % 4) == (a % 4)) + 0.5 * (a % 3 == 0)
    click = rng.random(n) < 1 / (1 + np.exp(-logit))
    ts = int(time.time() * 1000) if ts is None else ts
    return [schema.Example(
        example_id=f"ex{seed}_{i}", click=int(click[i]), conversion=0, emitted_ts=ts,
        impression=schema.Impression(event_id=f"imp{seed}_{i}", ts=ts - 60_000 + i, user_id=int(u[i]),
                                     ad_id=int(a[i]), campaign_id=int(a[i]) // 3, advertiser_id=int(a[i]) // 10,
                                     domain=schema.DOMAINS[i % 5], device=schema.DEVICES[i % 4], dense=[0.1],
                                     history=[int(x) for x in a[max(0, i - 3):i]]))
        for i in range(n)]


def _tcfg(**kw) -> TrainerConfig:
    base = {"device": "cpu", "backend": "torch", "hash_buckets": 2000, "cat_slots": 0, "dense_dim": 2,
            "user_model": False, "batch_size": 128}
    return TrainerConfig(**{**base, **kw})


def _train(learner: Learner, examples: list[schema.Example], bs: int = 128) -> None:
    for s in range(0, len(examples), bs):
        learner.train_step(featurize(examples[s:s + bs], learner.tcfg, learner.user_view, learner.loopfm_view))


def _side_sum(learner: Learner, imp: schema.Impression, side: tuple[str, ...]) -> np.ndarray:
    """The side's rows summed, read straight from the weight table (not through the model's forward)."""
    tc = learner.tcfg
    w = learner.model.emb.export_state()["weights"].numpy()  # (T, rows, D)
    names = table_names(tc)
    ids = {"user_id": [imp.user_id], "device": [stable_str_id(imp.device)], "country": [stable_str_id(imp.country)],
           "history": imp.history[-tc.history_len:], "ad_id": [imp.ad_id], "campaign_id": [imp.campaign_id],
           "advertiser_id": [imp.advertiser_id]}
    out = np.zeros(tc.embedding_dim, np.float32)
    for name in side:
        t = names.index(name)
        for x in ids[name]:
            out += w[t, int(hash_ids(np.array([x], np.uint64), np.array([t]), tc.hash_buckets)[0])]
    return out


# ---- what the FM publishes ------------------------------------------------------------------------------
def test_fm_embeddings_are_the_fms_side_vectors_of_the_batch():
    learner = Learner(_tcfg())
    exs = make_examples(640)
    _train(learner, exs)
    batch = exs[-128:]
    imps = [e.impression for e in batch]
    recs = fm_embeddings(learner, imps, now_ms=NOW, max_ids=50)
    users = {i.user_id for i in imps}
    ads = {i.ad_id for i in imps}
    got = {"user": {}, "ad": {}}
    for r in recs:
        assert r.model_version == learner.steps == 5 and r.ts == NOW and r.dim == 16 == representation_dim(learner.tcfg)
        assert len(r.ids) <= 50 and len(r.vectors) == len(r.ids) * r.dim
        got[r.kind].update(zip(r.ids, np.asarray(r.vectors, np.float32).reshape(-1, r.dim)))
    assert set(got["user"]) == users and set(got["ad"]) == ads
    last_of_user = {i.user_id: i for i in imps}
    for u, v in got["user"].items():  # the user's rows at its last impression of the batch (newest history)
        np.testing.assert_allclose(v, _side_sum(learner, last_of_user[u], USER_SIDE), rtol=1e-5, atol=1e-6)
    for a, v in got["ad"].items():
        imp = next(i for i in imps if i.ad_id == a)
        np.testing.assert_allclose(v, _side_sum(learner, imp, ("ad_id", "campaign_id", "advertiser_id")),
                                   rtol=1e-5, atol=1e-6)
    # the FM shortcut's user x ad term is the inner product of the two sides' factors (past the first-order
    # coordinates): checked against the model's own shortcut for one impression with only those tables
    from trainer.model import _shortcuts

    imp = last_of_user[next(iter(users))]
    n_obj = len(schema.OBJECTIVES)
    e = torch.from_numpy(np.stack([got["user"][imp.user_id], got["ad"][imp.ad_id]]))[None]  # (1, 2 sides, D)
    fm_term = float(_shortcuts(e, torch.tensor([0]))[0, 0] - e[0, :, 0].sum())
    assert fm_term == pytest.approx(float(got["user"][imp.user_id][n_obj:] @ got["ad"][imp.ad_id][n_obj:]), rel=1e-5)


def test_fm_embeddings_carry_the_user_model_vectors():
    learner = Learner(_tcfg(user_model=True, user_dim=4))
    torch.manual_seed(1)
    view = UserVectors(dim=4, ad_table=torch.randn(50, 4))
    imps = [e.impression for e in make_examples(64)]
    uids = sorted({i.user_id for i in imps})
    uvecs = np.arange(len(uids) * 4, dtype=np.float32).reshape(-1, 4)
    view.update(np.array(uids[:-1]), uvecs[:-1])  # the last user is not encoded yet
    learner.user_view = view
    recs = fm_embeddings(learner, imps)
    assert {r.dim for r in recs} == {20}
    users = {i: v for r in recs if r.kind == "user" for i, v in zip(r.ids, np.reshape(r.vectors, (-1, 20)))}
    ads = {i: v for r in recs if r.kind == "ad" for i, v in zip(r.ids, np.reshape(r.vectors, (-1, 20)))}
    for j, u in enumerate(uids):
        # scaled by 1 / sqrt(user_dim): the pair's inner product is the user model's affinity logit
        np.testing.assert_allclose(users[u][16:], uvecs[j] / 2.0 if j < len(uids) - 1 else 0.0)
    for a, v in ads.items():
        np.testing.assert_allclose(v[16:], view.ad_table[ad_rows(np.array([a]), 50)[0]].numpy(), rtol=1e-6)


# ---- the store -----------------------------------------------------------------------------------------
def _rec(kind="user", version=1, ts=NOW, dim=2, ids=(1,), vectors=None) -> schema.FMEmbeddings:
    vectors = [float(i + 1) for i in range(len(ids) * dim)] if vectors is None else vectors
    return schema.FMEmbeddings(kind=kind, model_version=version, ts=ts, dim=dim, ids=list(ids), vectors=list(vectors))


def test_store_keeps_the_newest_version_per_id_and_expires_by_age():
    st = FMEmbeddingStore(dim=2, max_age_s=60)
    assert st.apply(_rec(version=5, ids=[1, 2], vectors=[1, 1, 2, 2]), NOW) is None
    assert st.apply(_rec(version=3, ts=NOW + 1000, ids=[1, 3], vectors=[9, 9, 3, 3]), NOW + 1000) is None  # 1: older, ignored
    v, ok = st.lookup("user", [1, 2, 3, 4], NOW + 10_000)
    assert ok.tolist() == [True, True, True, False]
    assert v.tolist() == [[1, 1], [2, 2], [3, 3], [0, 0]]
    s = st.stats()
    assert (s["loopfm_older_ignored"], s["loopfm_lookups"], s["loopfm_misses"], s["loopfm_stale"]) == (1, 4, 1, 0)
    assert s["loopfm_age_p50_s"] == 10.0 and s["loopfm_fm_version"] == 5
    # past max_age: stale (found, not used), zeros
    v, ok = st.lookup("user", [1, 3], NOW + 60_500)
    assert ok.tolist() == [False, True] and v[0].tolist() == [0, 0]
    assert st.stats()["loopfm_stale"] == 1
    # an older version replaces a stale vector (an FM started over counts its steps from 0 again)
    st.apply(_rec(version=1, ts=NOW + 62_000, ids=[1], vectors=[7, 7]), NOW + 62_000)
    assert st.lookup("user", [1], NOW + 62_000)[0].tolist() == [[7, 7]]
    # a record already older than max_age when it arrives is not stored; users and ads are separate tables
    st.apply(_rec(ts=NOW, ids=[9]), NOW + 120_000)
    assert st.stats()["loopfm_expired_on_arrival"] == 1
    assert not st.lookup("ad", [1, 2, 3], NOW)[1].any()


def test_store_is_bounded_least_recently_updated_first():
    st = FMEmbeddingStore(dim=1, max_age_s=60, capacity={"user": 3})
    for i in range(5):
        st.apply(_rec(dim=1, ids=[i], vectors=[float(i)]), NOW)
    st.apply(_rec(dim=1, version=2, ids=[2], vectors=[2.5]), NOW)  # 2 updated: 3 is now the oldest
    st.apply(_rec(dim=1, ids=[5], vectors=[5.0]), NOW)
    v, ok = st.lookup("user", list(range(6)), NOW)
    assert ok.tolist() == [False, False, True, False, True, True]
    assert v.ravel().tolist() == [0, 0, 2.5, 0, 4, 5]
    assert st.stats()["loopfm_users"] == 3 and st.stats()["loopfm_evicted"] == 3


def test_bad_records_are_refused_with_a_reason():
    st = FMEmbeddingStore(dim=2, max_age_s=60)
    bad = {
        b"\x00not json": "",
        schema.encode(_rec(dim=3, vectors=[1.0, 2.0, 3.0])): "dim mismatch",
        schema.encode(_rec(ids=[1, 2], vectors=[1.0, 2.0, 3.0])): "3 values for 2 ids",
        schema.encode(_rec(vectors=[1.0, float("nan")])): "got `null`",  # JSON has no NaN: it is written null
        schema.encode(_rec(kind="pair")): "kind 'pair'",
        schema.encode(_rec(version=-1)): "model_version",
        schema.encode(_rec(ts=int(time.time() * 1000) + 3_600_000)): "in the future",
        schema.encode(_rec(ids=[-4])): "id outside",
    }
    for raw, want in bad.items():
        reason = st.apply_raw(raw)
        assert reason and want in reason, (raw, reason)
    for v in (float("nan"), float("inf")):  # a decoded record (msgpack-like paths, in-process callers)
        assert "NaN or infinite" in st.apply(_rec(vectors=[1.0, v]))
    s = st.stats()
    assert s["loopfm_dead_letters"] == len(bad) + 2 and s["loopfm_records"] == 0 and s["loopfm_users"] == 0


# ---- the VM's input ------------------------------------------------------------------------------------
def test_features_of_shapes_and_the_present_flag():
    st = FMEmbeddingStore(dim=3, max_age_s=60)
    st.apply(_rec(dim=3, ids=[1, 2], vectors=[1, 2, 3, 4, 5, 6]), NOW)
    st.apply(_rec(kind="ad", dim=3, ids=[10], vectors=[1, 0, 2]), NOW)
    st.apply(_rec(kind="ad", dim=3, ids=[11], ts=NOW - 59_000, vectors=[1, 1, 1]), NOW)
    imp = make_examples(1)[0].impression
    imps = [msgspec.structs.replace(imp, user_id=u, ad_id=a) for u, a in ((1, 10), (2, 10), (3, 10), (1, 12), (1, 11))]
    f = FMEmbeddingView(st).features_of(imps, now_ms=NOW + 2000)
    assert f.shape == (5, 10) and f.dtype == np.float32
    assert f[0].tolist() == [1, 2, 3, 1, 0, 2, 1, 0, 6, 1]
    assert f[1].tolist() == [4, 5, 6, 1, 0, 2, 4, 0, 12, 1]
    assert f[2].tolist() == [0, 0, 0, 1, 0, 2, 0, 0, 0, 0]  # user missing: its side zeros, present 0
    assert f[3].tolist() == [1, 2, 3, 0, 0, 0, 0, 0, 0, 0]  # ad missing
    assert f[4].tolist() == [1, 2, 3, 0, 0, 0, 0, 0, 0, 0]  # ad 11 is 61 s old: stale
    s = st.stats()
    assert (s["loopfm_lookups"], s["loopfm_misses"], s["loopfm_stale"]) == (10, 2, 1)


def test_the_vm_model_reads_the_loopfm_block_and_serving_refuses_it():
    tc = _tcfg(loopfm=True, loopfm_dim=4)
    learner = Learner(tc)
    assert learner.model.loopfm_in == 13
    plain = Learner(_tcfg())
    assert learner.model.bottom.in_features == plain.model.bottom.in_features + 13
    st = FMEmbeddingStore(dim=4, max_age_s=3600)
    learner.loopfm_view = FMEmbeddingView(st)
    exs = make_examples(256)
    st.apply(_rec(dim=4, ids=[e.impression.user_id for e in exs[:1]], vectors=[1.0] * 4, ts=int(time.time() * 1000)))
    fb = featurize(exs[:128], tc, None, learner.loopfm_view)
    assert fb.loopfm.shape == (128, 13) and fb.to_torch("cpu").loopfm.shape == (128, 13)
    assert featurize(exs[:8], tc).loopfm.tolist() == np.zeros((8, 13)).tolist()  # no view: zeros, present 0
    assert featurize(exs[:8], _tcfg()).loopfm is None
    before = learner.model.bottom.weight.detach().clone()
    learner.train_step(fb)
    assert not torch.equal(before, learner.model.bottom.weight)
    # the FM input changes the scores
    b = fb.to_torch("cpu")
    with torch.no_grad():
        p1 = learner.model(b)[0]
        p2 = learner.model(type(b)(**{**b.__dict__, "loopfm": torch.ones_like(b.loopfm)}))[0]
    assert not torch.allclose(p1, p2)
    with pytest.raises(ValueError, match="LoopFM"):
        impression_batch([e.impression for e in exs[:4]], tc, "cpu", None)
    with pytest.raises(ExportError, match="trainer.loopfm"):
        serving_model(msgspec.to_builtins(tc), feature_spec(tc), "cpu", "auto", "v1")


# ---- FM trainer -> broker -> VM trainer ------------------------------------------------------------------
def _stack_cfg(cfg, tmp_path):
    cfg = replace(cfg, topics={"fm_embeddings": cfg.topics.examples + "_fm",
                               "examples_distilled": cfg.topics.examples + "_distilled"})
    kafka_io.ensure_topics(cfg.kafka.bootstrap_servers, cfg.topics.all(), cfg.topics.partitions)
    common = {"device": "cpu", "backend": "torch", "hash_buckets": 2000, "cat_slots": 0, "dense_dim": 2,
              "user_model": False, "batch_size": 128, "checkpoint_every_s": 3600.0}
    fm = replace(cfg, trainer={**common, "role": "fm", "checkpoint_dir": str(tmp_path / "fm"),
                               "loopfm_dim": 16, "loopfm_publish_every_s": 0.0})
    vm = replace(cfg, trainer={**common, "role": "vm", "loopfm": True, "loopfm_dim": 16, "embedding_dim": 8,
                               "checkpoint_dir": str(tmp_path / "vm")})
    return cfg, fm, vm


def _produce(cfg, examples) -> None:
    prod = kafka_io.make_producer(cfg.kafka.bootstrap_servers)
    for ex in examples:  # a VM reads the distilled topic once the teacher join exists; both hold the stream
        for topic in (cfg.topics.examples, cfg.topics.examples_distilled):
            kafka_io.produce(prod, topic, schema.encode(ex), key=schema.user_key(ex.impression))
    prod.flush()


def _wait(cond, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not cond():
        time.sleep(0.05)
    return cond()


def test_vm_looks_up_what_the_fm_published(cfg, tmp_path):
    from trainer.loop import Trainer
    from trainer.telemetry import service_stats

    cfg, fm_cfg, vm_cfg = _stack_cfg(cfg, tmp_path)
    exs = make_examples(1000)
    _produce(cfg, exs)
    fm = Trainer(fm_cfg, resume=False)
    assert fm.learner.loopfm_view is None
    assert fm.run(idle_exit_s=1.0)["examples_trained"] == 1000
    pub = fm.loopfm.stats()
    n_users, n_ads = len({e.impression.user_id for e in exs}), len({e.impression.ad_id for e in exs})
    recs = [schema.decode(m.value(), schema.FMEmbeddings) for m in read_topics(cfg, cfg.topics.fm_embeddings)]
    assert len(recs) == pub["loopfm_published_messages"] and pub["loopfm_published_ids"] == sum(len(r.ids) for r in recs)
    assert {i for r in recs if r.kind == "user" for i in r.ids} == {e.impression.user_id for e in exs}
    assert {r.model_version for r in recs} == set(range(1, 9))  # one publish per trained batch (every_s 0)

    vm = Trainer(vm_cfg, resume=False)
    vm.loopfm.start(None)  # the store fills before the VM trains: every lookup can hit
    store = vm.loopfm.store
    assert _wait(lambda: store.stats()["loopfm_users"] == n_users and store.stats()["loopfm_ads"] == n_ads)
    assert _wait(lambda: store.stats()["loopfm_records"] == len(recs))
    assert store.stats()["loopfm_fm_version"] == 8
    assert vm.run(idle_exit_s=1.0)["examples_trained"] == 1000
    values = service_stats(vm, vm._stats).values
    assert values["loopfm_lookups"] == 2000 and values["loopfm_misses"] == 0 and values["loopfm_stale"] == 0
    assert 0 <= values["loopfm_age_p50_s"] < 60
    # the VM's features are the FM's newest vectors of each id
    last = {}
    for r in recs:
        if r.kind == "user":
            for i, j in enumerate(r.ids):
                if r.model_version >= last.get(j, (-1,))[0]:
                    last[j] = (r.model_version, r.vectors[i * 16:(i + 1) * 16])
    u = exs[0].impression.user_id
    np.testing.assert_allclose(vm.learner.loopfm_view.features_of([exs[0].impression])[0, :16], last[u][1], rtol=1e-6)
    # standardized: each coordinate over its running RMS
    np.testing.assert_allclose(FMEmbeddingView(store, standardize=True).features_of([exs[0].impression])[0, :16],
                               np.asarray(last[u][1]) / store.rms("user"), rtol=1e-5)


def test_vm_trains_on_without_an_fm_and_dead_letters_bad_records(cfg, tmp_path):
    from trainer.loop import Trainer

    cfg, _, vm_cfg = _stack_cfg(cfg, tmp_path)
    _produce(cfg, make_examples(500, seed=3))
    prod = kafka_io.make_producer(cfg.kafka.bootstrap_servers)
    kafka_io.produce(prod, cfg.topics.fm_embeddings, schema.encode(_rec(dim=3, vectors=[1.0, 2.0, 3.0])))
    prod.flush()
    vm = Trainer(vm_cfg, resume=False)
    vm.loopfm.start(None)
    assert _wait(lambda: vm.loopfm.store.stats()["loopfm_dead_letters"] == 1)
    assert vm.run(idle_exit_s=1.0)["examples_trained"] == 500
    s = vm.loopfm.stats()
    assert s["loopfm_lookups"] == 1000 and s["loopfm_misses"] == 1000 and "loopfm_age_p50_s" not in s
    dls = [schema.decode(m.value(), schema.DeadLetter) for m in read_topics(cfg, cfg.topics.dead_letters)]
    mine = [d for d in dls if d.step == STEP]
    assert len(mine) == 1 and "dim mismatch" in mine[0].reason and mine[0].topic == cfg.topics.fm_embeddings
