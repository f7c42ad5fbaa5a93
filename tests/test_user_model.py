"""User history, user model and its service: AUC lift as a ranking feature, snapshots, freshness."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from embedding_store.ann import AnnConfig
from streams import schema
from streams.metrics import roc_auc
from streams.sources.generate import GeneratorConfig, TruthParams, simulate
from trainer.features import hash_ids
from trainer.users.history import CLICK, CONVERSION, IMPRESSION, PRIOR, HistoryConfig, UserHistory
from trainer.users.model import UserModelConfig
from trainer.users.service import UserModelService, UserServiceConfig

TS = 1_800_000_000_000


def _imp(i: int, user: int, ad: int, ts: int, history=()) -> schema.Impression:
    return schema.Impression(event_id=f"i{i}", ts=ts, user_id=user, ad_id=ad, campaign_id=1, advertiser_id=1,
                             domain="feed", history=list(history))


def test_history_follows_raw_events_and_evicts_plain_impressions_first():
    h = UserHistory(HistoryConfig(max_len=4, engaged_only=False))
    h.observe(_imp(0, 1, 10, TS, history=[7]))
    h.observe(_imp(1, 1, 11, TS + 1))
    h.observe(schema.Click(event_id="c0", impression_id="i0", ts=TS + 5, user_id=1))
    h.observe(schema.Conversion(event_id="v0", impression_id="i0", ts=TS + 9, user_id=1))
    assert h.observe(schema.Click(event_id="c9", impression_id="nope", ts=TS, user_id=1)) is None
    h.observe(_imp(2, 1, 12, TS + 2))
    h.observe(_imp(3, 1, 13, TS + 3))  # full: the oldest plain impression (ad 11) goes, the prior stays
    assert [(e[1], e[2]) for e in h.get(1)] == [(7, PRIOR), (10, CONVERSION), (12, IMPRESSION), (13, IMPRESSION)]
    s = h.sequences([1], TS + 3, before_ms=True)  # strictly before ts: ad 13 is not its own feature
    assert s.ad[0][s.mask[0]].tolist() == [7, 10, 12]
    assert UserHistory(HistoryConfig(max_len=4)).observe_all([_imp(0, 2, 5, TS)]) == {2}


def test_history_snapshot_round_trip_and_user_bound(tmp_path):
    cfg = HistoryConfig(max_len=3, max_users=2)
    h = UserHistory(cfg)
    for i, u in enumerate([1, 2, 1, 3]):  # user 2 is the least recently touched when 3 arrives
        ex = schema.Example(example_id=f"e{i}", impression=_imp(i, u, 100 + i, TS + i), click=i % 2, conversion=0)
        h.observe(ex)
    assert 2 not in h and len(h) == 2 and h.evicted == 1
    back = UserHistory.load(h.save(tmp_path / "h.npz"), cfg)
    assert back.get(1) == h.get(1) and back.get(3) == h.get(3) and back.evicted == 1
    assert back.get(3)[-1][2] == CLICK and back.get(1)[-1][2] == IMPRESSION


def _traffic(n: int):
    """Traffic where the user's taste (latent x ad) dominates and users recur: a sequential signal."""
    g = GeneratorConfig(n_impressions=n, seed=1, n_users=300, n_ads=100, ad_churn=0.0,
                        truth=TruthParams(base_ctr={d: 0.1 for d in schema.DOMAINS}, latent_scale=1.5, latent_dim=4))
    sim = simulate(g)
    imps = [r for r in sim.records if isinstance(r, schema.Impression)]
    y = sim.truth.column("click").to_numpy().astype(int)  # truth rows follow impression order
    assert [i.event_id for i in imps] == sim.truth.column("impression_id").to_pylist()
    return [schema.Example(example_id=i.event_id, impression=i, click=int(c), conversion=0)
            for i, c in zip(imps, y)], y


class _Ranker(nn.Module):
    """Logistic regression: hashed one-hot (user, ad, domain, position, cat) + linear dense (+ user features)."""

    BUCKETS, TABLES = 1 << 15, 8

    def __init__(self, extra: int):
        super().__init__()
        self.w = nn.Embedding(self.BUCKETS, 1)
        nn.init.zeros_(self.w.weight)
        self.dense = nn.Linear(8 + extra, 1)

    @classmethod
    def rows(cls, imps) -> torch.Tensor:
        b = len(imps)
        cols = [[i.user_id for i in imps], [i.ad_id for i in imps], [schema.DOMAIN_INDEX[i.domain] for i in imps],
                [i.position for i in imps], *([i.cat[s] for i in imps] for s in range(4))]
        ids = np.array(cols, dtype=np.uint64)
        tables = np.repeat(np.arange(cls.TABLES), b)
        return torch.from_numpy(hash_ids(ids.ravel(), tables, cls.BUCKETS).reshape(cls.TABLES, b).T.copy())

    def forward(self, rows, x):
        return self.w(rows).sum((1, 2)) + self.dense(x).squeeze(-1)


def test_user_vector_lifts_ranking_auc_on_sequential_traffic(one_thread):
    """Progressive validation (score, then learn) of the same logistic ranker with and without the user
    model's features (u, u * ad vector); the user model trains online on the same stream, one batch behind."""
    examples, y = _traffic(16_000)
    svc = UserModelService(UserServiceConfig(model=UserModelConfig(dim=32, max_len=32, ad_buckets=20_011, lr=0.01),
                                             index=AnnConfig(dim=32, kind="exact"), refresh_every_s=0.5))
    rankers = {"base": _Ranker(0), "user": _Ranker(64)}
    opts = {k: torch.optim.Adagrad(m.parameters(), lr=0.05) for k, m in rankers.items()}
    preds = {k: [] for k in rankers}
    for s in range(0, len(examples), 128):
        batch = examples[s:s + 128]
        imps = [e.impression for e in batch]
        rows = _Ranker.rows(imps)
        dense = torch.tensor(np.array([i.dense for i in imps]), dtype=torch.float32)
        u, cross = svc.features(imps)  # from histories strictly before each impression
        x = {"base": dense, "user": torch.cat([dense, torch.from_numpy(np.concatenate([u, cross], 1))], 1)}
        label = torch.tensor([float(e.click) for e in batch])
        for k, m in rankers.items():
            logit = m(rows, x[k])
            preds[k].append(torch.sigmoid(logit).detach().numpy())
            loss = nn.functional.binary_cross_entropy_with_logits(logit, label)
            opts[k].zero_grad()
            loss.backward()
            opts[k].step()
        svc.process(batch)  # the user model learns from this batch only after the ranker scored it
    auc = {k: roc_auc(y, np.concatenate(p)) for k, p in preds.items()}
    late = {k: roc_auc(y[8000:], np.concatenate(p)[8000:]) for k, p in preds.items()}
    assert auc["user"] - auc["base"] > 0.015, (auc, late)
    assert late["user"] > late["base"], (auc, late)
    # the service kept the index fresh: every user has a vector, written at their latest event
    assert len(svc.index) == len({e.impression.user_id for e in examples})
    assert svc.freshness_ms()["n"] > 0 and svc.freshness_ms()["p50"] < 5_000


def test_service_checkpoint_round_trip(tmp_path, one_thread):
    examples, _ = _traffic(1_500)
    cfg = UserServiceConfig(model=UserModelConfig(dim=8, max_len=8, ad_buckets=1000),
                            index=AnnConfig(dim=8, kind="exact"), refresh_every_s=3600)
    svc = UserModelService(cfg)
    svc.process(examples[:1000])
    assert len(svc.index) == 0  # not due yet; save() publishes the dirty users first
    svc.save(tmp_path / "users")
    back = UserModelService.load(tmp_path / "users", cfg)
    assert len(back.index) == len(svc.index) > 0
    imps = [e.impression for e in examples[1000:1100]]
    np.testing.assert_allclose(back.features(imps)[0], svc.features(imps)[0], atol=1e-5)
    users = svc.index.ids()
    assert back.index.written_ts(users).tolist() == svc.index.written_ts(users).tolist()
    # training continues identically from the restored optimiser state
    a, b = svc.process(examples[1000:1200]), back.process(examples[1000:1200])
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_raw_events_refresh_the_user_vector():
    cfg = UserServiceConfig(model=UserModelConfig(dim=8, max_len=8, ad_buckets=1000),
                            index=AnnConfig(dim=8, kind="numpy"), refresh_every_s=0)
    svc = UserModelService(cfg)
    svc.observe([_imp(0, 5, 10, TS, history=[1, 2])])
    v0, t0 = svc.index.get(np.array([5])), svc.index.written_ts(np.array([5]))[0]
    svc.observe([schema.Click(event_id="c", impression_id="i0", ts=TS + 7000, user_id=5)])
    assert svc.index.written_ts(np.array([5]))[0] == TS + 7000 > t0
    assert not np.allclose(svc.index.get(np.array([5])), v0)  # the click entered the sequence
    with pytest.raises(ValueError, match="index.dim 4 != model.dim 8"):
        UserModelService(UserServiceConfig(model=UserModelConfig(dim=8), index=AnnConfig(dim=4)))


def _transformer_only(model) -> None:
    """The model as it was before the reader path: reader weights 0 (frozen), the transformer's gain 1."""
    with torch.no_grad():
        model.tower.read.weight.zero_()
        model.tower.tf_gain.fill_(1.0)
    model.tower.read.weight.requires_grad_(False)
    model.tower.tf_gain.requires_grad_(False)


def test_the_reader_learns_the_sessions_world_where_the_transformer_alone_did_not(one_thread):
    """The user model's own progressive click AUC on bench llatte's world (second half of 8k impressions): the
    reader path (on by default) against the transformer alone (the first version, stuck near 0.55-0.59)."""
    from benchmarks._simulated import example_stream, truth_arrays
    from benchmarks.llatte import AD_BUCKETS, SEED, WORLD

    sim = simulate(GeneratorConfig(n_impressions=8000, seed=SEED, **WORLD))
    truth, exs = truth_arrays(sim), example_stream(sim, "oracle", elapsed_s=0)
    order = np.array([int(e.example_id.rsplit("-", 1)[1]) for e in exs])
    auc = {}
    for name in ("reader", "transformer only"):
        svc = UserModelService(UserServiceConfig(
            model=UserModelConfig(dim=16, max_len=16, ad_buckets=AD_BUCKETS, lr=1e-2),
            history=HistoryConfig(max_len=16), index=AnnConfig(dim=16, kind="numpy"), refresh_every_s=3600))
        if name != "reader":
            _transformer_only(svc.model)
        p = np.concatenate([svc.process(exs[j:j + 64])["p_click"] for j in range(0, len(exs), 64)])
        y = truth["click"][order]
        late = truth["ts"][order] >= np.median(truth["ts"])
        auc[name] = roc_auc(y[late], p[late])
    assert auc["reader"] > auc["transformer only"] + 0.015, auc


def test_a_state_from_before_the_reader_loads_as_the_transformer_it_was():
    from trainer.users.model import NEW_PARAMS, UserModel

    examples, _ = _traffic(600)
    svc = UserModelService(UserServiceConfig(model=UserModelConfig(dim=8, max_len=8, ad_buckets=1000),
                                             index=AnnConfig(dim=8, kind="numpy"), refresh_every_s=3600))
    _transformer_only(svc.model)
    svc.process(examples[:300])
    svc.process(examples[300:])
    st = svc.model.state()
    # what the first version wrote: no reader parameters in the tower, none in the dense optimiser's state
    names = svc.model._dense_names
    keep = [j for j, k in enumerate(names) if k not in NEW_PARAMS]
    old = {**st, "tower": {k: v for k, v in st["tower"].items() if k not in NEW_PARAMS},
           "opt_dense": {"state": {i: st["opt_dense"]["state"][j] for i, j in enumerate(keep)},
                         "param_groups": [{**st["opt_dense"]["param_groups"][0], "params": list(range(len(keep)))}]}}
    back = UserModel(svc.model.cfg)
    back.load_state(old)
    assert float(back.tower.tf_gain) == 1.0 and not back.tower.read.weight.any()
    imps = [e.impression for e in examples[:50]]
    s = svc.history.sequences([i.user_id for i in imps], [i.ts for i in imps], max_len=8)
    np.testing.assert_array_equal(back.encode(s), svc.model.encode(s))
    moments = back.opt_dense.state_dict()["state"]
    for j in keep:  # every other parameter keeps its Adam moments, under its new index
        torch.testing.assert_close(moments[j]["exp_avg"], st["opt_dense"]["state"][j]["exp_avg"])
    with pytest.raises(ValueError, match="dense parameters"):
        UserModel(svc.model.cfg).load_state({**old, "opt_dense": {**old["opt_dense"], "param_groups": [
            {**old["opt_dense"]["param_groups"][0], "params": keep[:-1]}]}})
