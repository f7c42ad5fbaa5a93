"""Users who leave: TTL in event time with a floor of the most active, through histories, view and index."""

from __future__ import annotations

import numpy as np
import pytest

from embedding_store.ann import AnnConfig, make_index, normalize
from streams import schema
from config import Config, load_config
from trainer.users.features import UserWorker, user_worker
from trainer.users.history import HistoryConfig, TtlConfig, UserHistory, expired
from trainer.users.model import UserModelConfig
from trainer.users.service import UserModelService, UserServiceConfig

TS = 1_800_000_000_000
S = 1000  # ms
DIM = 8
# one body over the reference and the FAISS kinds (the last: the trainer's codec and quantizer, trained)
KINDS = {
    "numpy": AnnConfig(dim=DIM, kind="numpy"),
    "exact": AnnConfig(dim=DIM, kind="exact"),
    "ivf-hnsw-fp16": AnnConfig(dim=DIM, kind="ivf", nlist=4, nprobe=4, quantizer="hnsw", hnsw_m=4, codec="fp16"),
}


def _imp(i: int, user: int, ts: int, ad: int = 1) -> schema.Impression:
    return schema.Impression(event_id=f"i{i}-{user}-{ts}", ts=ts, user_id=user, ad_id=ad, campaign_id=1,
                             advertiser_id=1, domain="feed", history=[3, 4])


def _service(kind: str = "numpy", ttl_s: float = 100.0, keep: int = 2, **history) -> UserModelService:
    cfg = UserServiceConfig(model=UserModelConfig(dim=DIM, max_len=8, ad_buckets=1000),
                            history=HistoryConfig(ttl=TtlConfig(ttl_s=ttl_s, keep=keep), **history),
                            index=KINDS[kind], refresh_every_s=0)  # every observe() call refreshes
    index = make_index(cfg.index)
    if cfg.index.kind == "ivf":
        index.train(np.random.default_rng(0).normal(size=(64, DIM)))
    return UserModelService(cfg, index=index)


def _members(svc: UserModelService) -> list[int]:
    """The users of the index, after checking that the view and the histories hold the same ones."""
    ids = sorted(svc.index.ids().tolist())
    assert sorted(svc.view.ids().tolist()) == ids
    assert sorted(u for u in ids if u in svc.history) == ids and len(svc.history) == len(ids)
    return ids


@pytest.fixture(params=list(KINDS))
def kind(request):
    return request.param


def test_users_leave_after_the_ttl_in_event_time_except_the_most_active_and_come_back(kind):
    svc = _service(kind, ttl_s=100, keep=2)
    svc.observe([_imp(i, 1, TS + i) for i in range(5)] + [_imp(0, 2, TS), _imp(0, 3, TS)])  # user 1: busiest
    svc.observe([_imp(0, 4, TS + 50 * S)])
    svc.observe([_imp(0, 5, TS + 100 * S)])  # users 2 and 3 are exactly 100 s old: not yet over the TTL
    assert _members(svc) == [1, 2, 3, 4, 5] and svc.counters["evicted"] == 0
    # an expiry pass runs once event time moved ttl / 16 (6.25 s) since the last one: at 107 s users 1, 2, 3
    # are stale, and 1 (5 events) and 5 (2 events) are the 2 most active
    svc.observe([_imp(1, 5, TS + 107 * S)])
    assert _members(svc) == [1, 4, 5] and svc.counters["evicted"] == 2
    assert svc.index.written_ts(np.array([2, 3])).tolist() == [-1, -1]
    assert not svc.view.features(np.array([2, 3]), np.array([1, 1])).any()  # the ranker reads "no vector"
    assert svc.history.get(2) == [] and svc.history.last_seen(2) == -1

    svc.observe([_imp(1, 2, TS + 108 * S)])  # user 2 comes back: a new user, from its new events only
    assert _members(svc) == [1, 2, 4, 5]
    assert svc.index.written_ts(np.array([2])).tolist() == [TS + 108 * S]
    assert [e[0] for e in svc.history.get(2)] == [0, 0, TS + 108 * S]  # seeded priors, then the new impression
    if kind != "ivf-hnsw-fp16":  # (fp16 lists hold vectors to ~1e-3)
        ids = svc.index.ids()
        np.testing.assert_allclose(svc.index.get(ids), normalize(svc.view.get(ids) - svc.center), atol=1e-6)

    # a quiet stream that resumes after a long gap: everyone is stale, the floor keeps the 2 most active
    svc.observe([_imp(0, 6, TS + 1000 * S)])
    assert _members(svc) == [1, 6] and svc.counters["evicted"] == 5


def test_ttl_zero_never_evicts_and_keep_zero_has_no_floor():
    never = _service(ttl_s=0, keep=0)
    none_kept = _service(ttl_s=100, keep=0)
    for svc in (never, none_kept):
        svc.observe([_imp(i, u, TS) for i, u in enumerate(range(1, 5))])
        svc.observe([_imp(0, 9, TS + 10**6 * S)])
    assert _members(never) == [1, 2, 3, 4, 9] and never.counters["evicted"] == 0
    assert _members(none_kept) == [9] and none_kept.counters["evicted"] == 4
    with pytest.raises(ValueError, match="ttl_s must be finite and >= 0"):
        UserHistory(HistoryConfig(ttl=TtlConfig(ttl_s=-1)))


def test_users_over_max_users_leave_the_index_and_the_view_too():
    svc = _service(ttl_s=0, max_users=2)
    for u in (1, 2, 3):  # user 1 is the least recently touched when user 3 arrives
        svc.observe([_imp(0, u, TS + u)])
    assert _members(svc) == [2, 3] and svc.history.evicted == 1 and svc.counters["evicted"] == 0


def test_the_ttl_is_exact_in_event_time():
    last = np.array([0, 0, 0])
    got = [expired(np.array([1, 2, 3]), last, np.ones(3), now_ms=now, ttl_ms=100 * S, keep=0).tolist()
           for now in (100 * S, 100 * S + 1)]
    assert got == [[False] * 3, [True] * 3]
    # the floor among equal activity: the more recently seen, then the smaller id
    assert expired(np.array([6, 5, 7]), np.array([0, 0, 10]), np.ones(3), now_ms=1000, ttl_ms=100,
                   keep=2).tolist() == [True, False, False]


def test_activity_decays_with_event_age_and_late_events_count_less():
    h = UserHistory(HistoryConfig(ttl=TtlConfig(ttl_s=100, keep=2)))
    for k in range(4):  # at 360 s, user 1: 4 events 360 s old -> 4 / 2**3.6 = 0.33; user 2: 1 event 110 s old -> 0.47
        h.observe(_imp(k, 1, TS + k))
    h.observe(_imp(0, 2, TS + 250 * S))
    h.observe(_imp(0, 3, TS + 300 * S))
    h.observe(_imp(0, 3, TS + 200 * S))  # late: counts 0.5, user 3's last-seen time stays
    assert h.last_seen(3) == TS + 300 * S and h.clock == TS + 300 * S
    assert h._seen[3][1] == pytest.approx(1.5) and h._seen[1][1] == pytest.approx(4, rel=1e-4)
    # stale: 1 and 2 (over 100 s); the floor keeps the 2 most active as of now: 3 (1.5 / 2**0.6 = 0.99) and 2
    assert h.expire(TS + 360 * S).tolist() == [1]
    assert 1 not in h and 2 in h and 3 in h and h.expired == 1


def test_checkpoints_round_trip_last_seen_times_and_evict_alike(tmp_path):
    a = _service(ttl_s=100, keep=2)
    a.observe([_imp(i, u, TS + u * S) for i, u in enumerate(range(1, 6))] + [_imp(9, 3, TS + 3 * S + 1)])
    a.observe([_imp(0, 7, TS + 60 * S)])
    b = _service(ttl_s=100, keep=2)
    b.load_state(a.state())
    c = UserModelService.load(a.save(tmp_path / "users"), a.cfg)
    for svc in (b, c):
        assert {u: svc.history.last_seen(u) for u in range(1, 8)} == {u: a.history.last_seen(u) for u in range(1, 8)}
        assert svc.history._seen == a.history._seen and svc.history.clock == a.history.clock
        assert _members(svc) == _members(a)
    for svc in (a, b, c):  # the same later event: 1, 2, 3, 4 are stale; the floor keeps 8 (new) and 3 (2 events)
        svc.observe([_imp(0, 8, TS + 104 * S + 1)])
    assert _members(a) == _members(b) == _members(c) == [3, 5, 7, 8]
    assert a.counters["evicted"] == b.counters["evicted"] == 3


def test_a_history_snapshot_from_before_the_ttl_restores_last_seen_from_its_entries():
    h = UserHistory(HistoryConfig())
    h.observe(_imp(0, 1, TS))
    h.observe(_imp(1, 1, TS + 5 * S))
    snap = {k: v for k, v in h.snapshot().items() if k not in ("last_seen", "activity", "clock", "expired_at", "expired")}
    back = UserHistory.restore(snap)
    assert back.last_seen(1) == TS + 5 * S and back.clock == TS + 5 * S and back._seen[1][1] == 2.0


def test_evicted_users_are_counted_in_the_trainer_service_stats():
    w = UserWorker(_service(ttl_s=100, keep=1))
    try:
        w.submit([schema.Example(example_id=f"e{u}", impression=_imp(0, u, TS + u), click=0, conversion=0)
                  for u in range(1, 5)])
        w.drain()
        assert w.stats()["user_evicted"] == 0 and w.stats()["user_vectors"] == 4
        w.submit([schema.Example(example_id="e9", impression=_imp(0, 9, TS + 200 * S), click=0, conversion=0)])
        w.drain()
        st = w.stats()
        assert st["user_evicted"] == 4 and st["user_evicted_cap"] == 0 and st["user_vectors"] == 1
    finally:
        w.close()


def test_the_trainer_config_sets_the_ttl_and_the_floor():
    cfg = load_config(env={"STREAMREC_TRAINER__USER_TTL_S": "3600", "STREAMREC_TRAINER__USER_TTL_KEEP": "7"})
    w = user_worker(cfg)
    try:
        assert w.svc.cfg.history.ttl == TtlConfig(ttl_s=3600.0, keep=7)
    finally:
        w.close()
    assert Config().trainer.user_ttl_s == 7 * 86_400 and Config().trainer.user_ttl_keep == 10_000
    with pytest.raises(ValueError, match="trainer.user_ttl_s"):
        user_worker(load_config(env={"STREAMREC_TRAINER__USER_TTL_S": "-5"}))
