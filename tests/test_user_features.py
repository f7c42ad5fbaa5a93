"""The user model beside the ranker: background worker, ranker features, checkpoint state."""

from __future__ import annotations

import time

import numpy as np
import pytest

from embedding_store.ann import AnnConfig
from streams import schema
from config import TrainerConfig
from streams.sources.generate import GeneratorConfig, simulate
from trainer.features import featurize
from trainer.model import Learner
from trainer.users.features import UserVectors, UserWorker
from trainer.users.model import UserModelConfig
from trainer.users.service import UserModelService, UserServiceConfig

DIM = 8


@pytest.fixture(scope="module")
def examples() -> list[schema.Example]:
    sim = simulate(GeneratorConfig(n_impressions=3000, seed=5, n_users=300))
    clicks = {r.impression_id for r in sim.records if isinstance(r, schema.Click)}
    return [schema.Example(example_id=r.event_id, impression=r, click=int(r.event_id in clicks), conversion=0)
            for r in sim.records if isinstance(r, schema.Impression)]


def _worker(seed: int = 0, refresh_every_s: float = 0.05) -> UserWorker:
    cfg = UserServiceConfig(model=UserModelConfig(dim=DIM, max_len=8, ad_buckets=1000),
                            index=AnnConfig(dim=DIM, kind="exact"), refresh_every_s=refresh_every_s, seed=seed)
    return UserWorker(UserModelService(cfg))


def _assert_the_view_follows_the_index(w: UserWorker, users: np.ndarray) -> None:
    f = w.view.features(users, np.zeros(len(users), np.int64))
    c = f[:, :DIM] - w.svc.center  # the index holds centred vectors (cosine), the ranker raw ones
    np.testing.assert_allclose(c / np.linalg.norm(c, axis=1, keepdims=True), w.svc.index.get(users), atol=1e-6)


def test_every_submitted_example_reaches_the_histories_once_and_the_view_follows_the_index(examples):
    w = _worker()
    try:
        for s in range(0, len(examples), 100):  # submitted faster than the model trains: some are absorbed
            w.submit(examples[s:s + 100])
        w.drain()
        c = w.svc.counters
        assert c["examples"] + c.get("examples_absorbed", 0) == len(examples)
        assert w.trained_batches >= 1 and w.trained_batches + w.absorbed_batches == len(range(0, len(examples), 100))
        users = np.array(sorted({e.impression.user_id for e in examples}))
        assert len(w.view) == len(w.svc.index) == len(users)
        _assert_the_view_follows_the_index(w, users)
        f = w.view.features(users, np.zeros(len(users), np.int64))
        raw = f[:, :DIM] / np.linalg.norm(f[:, :DIM], axis=1, keepdims=True)
        pairs = np.random.default_rng(0).integers(0, len(users), (500, 2))
        cos_raw = (raw[pairs[:, 0]] * raw[pairs[:, 1]]).sum(1).mean()
        idx = w.svc.index.get(users)
        cos_idx = (idx[pairs[:, 0]] * idx[pairs[:, 1]]).sum(1).mean()
        # centring removes what all users share (the reader's raw vectors are means of the ads users engaged
        # with: popular ads are shared, ~0.13 here; the transformer-only model's shared ~0.97 of cosine)
        assert cos_raw > 0.1 and abs(cos_idx) < 0.1 and cos_raw > 5 * abs(cos_idx), (cos_raw, cos_idx)
        ad = w.svc.model.ad_vectors(np.zeros(1, np.int64))
        np.testing.assert_allclose(f[:, DIM:], f[:, :DIM] * ad, rtol=1e-6)
        unknown = w.view.features(np.array([10**12]), np.array([1]))
        assert unknown.shape == (1, 2 * DIM) and not unknown.any()
    finally:
        w.close()


@pytest.mark.parametrize("refresh_every_s", [0.0, 3600.0])
def test_the_view_follows_the_index_when_refreshes_split_the_stream(examples, refresh_every_s):
    # The test above failed on a busy machine: its batches usually reach the worker's histories before the
    # first refresh is due, so one refresh publishes every user; under load the due time passed part way
    # through (in absorb/process -> maybe_refresh, or the idle wake-up), the users of the earlier batches
    # were published against the centre of that moment, and the final refresh moved the centre for the
    # users it re-encoded only. Forced here: a refresh after every batch (0 s), or only at a checkpoint's
    # drain half way and at the end (3600 s: no refresh falls due in between).
    w = _worker(refresh_every_s=refresh_every_s)
    try:
        for s in range(0, len(examples), 100):
            w.submit(examples[s:s + 100])
            if s == 1500:
                w.state()  # a checkpoint: drain + refresh
        w.drain()
        first = {e.impression.user_id for e in examples[:1600]}
        assert first - {e.impression.user_id for e in examples[1600:]}  # users published by the first refresh only
        assert w.svc.counters["refreshes"] >= 2
        users = np.array(sorted({e.impression.user_id for e in examples}))
        assert len(w.view) == len(w.svc.index) == len(users)
        _assert_the_view_follows_the_index(w, users)
    finally:
        w.close()


def test_state_round_trip_restores_model_histories_index_and_view(examples):
    a = _worker()
    try:
        a.submit(examples[:1500])
        st = a.state()
        b = _worker()
        b.load_state(st)
        users = np.array(sorted({e.impression.user_id for e in examples[:1500]}))
        ads = np.array([e.impression.ad_id for e in examples[:len(users)]])
        np.testing.assert_array_equal(a.view.features(users, ads), b.view.features(users, ads))
        assert b.svc.history.get(int(users[0])) == a.svc.history.get(int(users[0]))
        # both continue identically from the same state (under the workers' locks: an idle worker thread
        # refreshes on its own every refresh period, and must not encode while the model trains)
        for w in (a, b):
            with w._lock:
                w.svc.process(examples[1500:1600])
                w.svc.refresh()
        np.testing.assert_array_equal(a.view.features(users, ads), b.view.features(users, ads))
        b.close()
        frozen = UserVectors.from_state(a.view.state())
        np.testing.assert_array_equal(frozen.features(users, ads), a.view.features(users, ads))
    finally:
        a.close()


def test_view_rows_of_deleted_users_are_reused_only_after_the_next_delete():
    import torch

    v = UserVectors(dim=2, ad_table=torch.ones(4, 2), capacity=4)
    v.update(np.arange(4), np.arange(8, dtype=np.float32).reshape(4, 2))
    rows = dict(v._row)
    assert v.delete(np.array([1, 2, 99])) == 2 and len(v) == 2 and 1 not in v
    v.update(np.array([10]), np.ones((1, 2), np.float32))  # a reader that looked up user 1 just before the
    assert v._row[10] not in (rows[1], rows[2])           # delete must not see user 10's vector in its row
    assert not v.features(np.array([1, 2]), np.zeros(2, np.int64)).any()
    v.delete(np.array([0]))  # one delete later the rows of 1 and 2 are reused
    v.update(np.array([11, 12]), np.full((2, 2), 5, np.float32))
    assert {v._row[11], v._row[12]} == {rows[1], rows[2]}
    np.testing.assert_array_equal(v.get(np.array([3, 10, 11, 12])), [[6, 7], [1, 1], [5, 5], [5, 5]])
    assert sorted(v.vectors()["ids"].tolist()) == [3, 10, 11, 12]


def test_a_failure_in_the_worker_thread_surfaces_in_the_trainer(examples):
    w = _worker()
    try:
        w.submit(["not an example"])  # type: ignore[list-item]  process() raises in the thread
        with pytest.raises(RuntimeError, match="user model thread failed"):
            w.drain()
        with pytest.raises(RuntimeError, match="user model thread failed"):
            w.submit(examples[:10])
    finally:
        w.close()


def test_the_ranker_reads_the_user_features(examples):
    tc = TrainerConfig(hash_buckets=1000, device="cpu", backend="torch", user_dim=DIM)
    learner = Learner(tc)
    w = _worker()
    try:
        learner.user_view = w.view
        batch = examples[:256]
        fb0 = featurize(batch, tc, learner.user_view)
        assert fb0.user.shape == (256, 2 * DIM) and not fb0.user.any()  # nobody encoded yet
        w.submit(batch)
        w.drain()
        fb1 = featurize(batch, tc, learner.user_view)
        assert fb1.user[:, :DIM].any(axis=1).all()
        p0, p1 = learner.score(fb0)[0], learner.score(fb1)[0]
        assert not np.allclose(p0, p1)  # the features reach the model's input
        st = learner.state()
        back = Learner(tc)
        back.load_state(st)
        np.testing.assert_array_equal(back.score(featurize(batch, tc, back.user_view))[0], p1)
    finally:
        w.close()
    off = TrainerConfig(hash_buckets=1000, device="cpu", backend="torch", user_model=False)
    assert featurize(examples[:4], off).user is None
    assert Learner(off).model.cross[0].in_features + 2 * 32 == Learner(TrainerConfig(
        hash_buckets=1000, device="cpu", backend="torch")).model.cross[0].in_features


def test_an_idle_worker_still_publishes_the_last_users_within_a_refresh_period(examples):
    cfg = UserServiceConfig(model=UserModelConfig(dim=DIM, max_len=8, ad_buckets=1000),
                            index=AnnConfig(dim=DIM, kind="exact"), refresh_every_s=0.3)
    w = UserWorker(UserModelService(cfg))
    try:
        w.submit(examples[:200])  # processed at once, before the first refresh is due: its users stay dirty
        users = {e.impression.user_id for e in examples[:200]}
        deadline = time.monotonic() + 5.0
        while len(w.view) < len(users) and time.monotonic() < deadline:
            time.sleep(0.05)  # no drain(), no further batch: only the idle wake-up can refresh
        assert len(w.view) == len(users) and w.svc.counters["refreshes"] >= 1
        assert w.svc.freshness_ms()["max"] < 3000
    finally:
        w.close()
