"""FIITED store: contract tests over the pooled store and its dict/numpy reference twin (STYLE #10/#11)."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch

from embedding_store.config import FiitedConfig
from embedding_store.fiited import FiitedEmbeddings
from embedding_store.ids import IdError
from embedding_store.reference import ReferenceStore

T, R, B = 3, 64, 8
CFG = FiitedConfig(chunk_dim=4, num_chunks=4, pool_chunks=(1, 2, 4), budget=0.5, maintain_every=5,
                   resize_every=10, admit_hits=2, ttl_steps=1000, lr=0.1)
IMPLS = {"fiited": FiitedEmbeddings, "reference": ReferenceStore}


def batch(rng: np.random.Generator, hot: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, offsets) for T*B bags of 1-3 ids, ids Zipf-ish below ``hot``."""
    lengths = rng.integers(1, 4, T * B)
    idx = np.minimum(rng.zipf(1.5, int(lengths.sum())) - 1, hot - 1)
    return torch.from_numpy(idx.astype(np.int64)), torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]))


def train(store, steps: int, seed: int = 0, hot: int = 24) -> torch.Tensor:
    """``steps`` updates with a fixed random upstream gradient; returns the last output."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    out = None
    for _ in range(steps):
        idx, off = batch(rng, hot)
        out = store(idx, off)
        (out * torch.randn(out.shape, generator=gen)).sum().backward()
        store.step()
    return out


@pytest.fixture(params=sorted(IMPLS))
def impl(request):
    return IMPLS[request.param]


def test_new_ids_share_until_admitted(impl):
    s = impl(T, R, CFG)
    idx, off = torch.tensor([5] + [0] * (T * B - 1)), torch.arange(T * B + 1)
    assert s.chunks(0, 5) == 0 and np.array_equal(s.row(0, 5), s.row(0, 6))  # both read the shared row
    for _ in range(CFG.maintain_every):
        s(idx, off).sum().backward()
        s.step()
    assert s.chunks(0, 5) == CFG.num_chunks and s.chunks(0, 6) == 0  # seen >= admit_hits: own row, full width
    assert s.counters["admitted"] >= 1                                 # while the budget has room


def test_admission_width_follows_the_free_budget(impl):
    # budget 0.06 of 3 tables x 64 rows x 17 floats: 783 B; rows cost 20 / 36 / 68 B at 4 / 8 / 16 dims
    s = impl(T, R, replace(CFG, budget=0.06, admit_hits=1, maintain_every=1000, resize_every=1000))
    off = torch.arange(T * B + 1)
    # step 1: ids 1-6 of table 0 and id 0 of each table: 9 x 68 B fit (171 B left); step 2: 3 x 68 B do not,
    # 3 x 36 B do (63 B left); step 3: 6 x 20 B do not: the 3 that fit get the smallest width
    for ids, want in (([1, 2, 3, 4, 5, 6], 4), ([7, 8, 9], 2), (list(range(10, 16)), 1)):
        idx = torch.tensor([0] * (T * B))
        idx[: len(ids)] = torch.tensor(ids)
        s(idx, off).sum().backward()
        s.step()  # 6 ids of table 0 (and id 0 of every table) seen once: admitted as wide as the room allows
        assert s.chunks(0, ids[0]) == want, (ids, [s.chunks(0, i) for i in ids])
    used = sum(4 * (s.chunks(t, v) * CFG.chunk_dim + 1) for t in range(T) for v in range(R) if s.chunks(t, v))
    assert used <= 0.06 * T * R * (CFG.dim + 1) * 4
    assert [s.chunks(0, v) for v in range(10, 16)] == [1, 1, 1, 0, 0, 0]  # the budget ran out: the rest share


def test_retained_chunks_survive_resize_and_pruned_chunks_are_zero(impl):
    s = impl(T, R, replace(CFG, budget=0.12))
    train(s, CFG.resize_every - 1)
    before = {(t, v): (s.chunks(t, v), s.row(t, v)) for t in range(T) for v in range(R)}
    train(s, 1, seed=99)  # step resize_every: maintenance + resize (and one more update)
    assert s.counters["resized"] > 0
    for (t, v), (c0, w0) in before.items():
        c1, w1 = s.chunks(t, v), s.row(t, v)
        if c0 and c1 and c1 != c0:
            k = min(c0, c1) * CFG.chunk_dim
            # the update of the last step moves weights a little: compare with the lr scale
            assert np.allclose(w1[:k], w0[:k], atol=2 * CFG.lr), (t, v)
        if c1:
            assert not w1[c1 * CFG.chunk_dim:].any(), (t, v, c1)
    # a bag of one pruned id returns zeros beyond its width
    t, v = next((t, v) for t in range(T) for v in range(R) if 0 < s.chunks(t, v) < CFG.num_chunks)
    idx = torch.tensor([v] * (T * B))
    with torch.no_grad():
        out = s(idx, torch.arange(T * B + 1))
    c = s.chunks(t, v) * CFG.chunk_dim
    assert not out[0, t * CFG.dim + c:(t + 1) * CFG.dim].any()
    assert np.array_equal(out[0, t * CFG.dim:(t + 1) * CFG.dim].numpy(), s.row(t, v))


def test_budget_is_respected(impl):
    cfg = replace(CFG, budget=0.1, admit_hits=1)
    s = impl(T, R, cfg)
    train(s, 40, hot=R)
    rows = s.memory_report()
    used = sum(rows[f"fiited_rows_d{d}"] * 4 * (d + 1) for d in cfg.pool_dims())
    assert 0 < used <= cfg.budget * T * R * (cfg.dim + 1) * 4
    assert rows["fiited_rows_d4"] + rows["fiited_rows_d8"] + rows["fiited_rows_d16"] > 0


def test_eviction_respects_the_floor(impl):
    cfg = replace(CFG, ttl_steps=10, protect_quantile=0.5, admit_hits=1, resize_every=1000, maintain_every=5)
    s = impl(T, R, cfg)
    train(s, 5, hot=R)  # many slots admitted at step 5
    live0 = {(t, v) for t in range(T) for v in range(R) if s.chunks(t, v)}
    keys = np.array([t * R + v for t, v in sorted(live0)])
    imp0 = dict(zip(sorted(live0), s.importance(keys).tolist()))
    # make importance explicit: slots (t, v<8) important, the rest not
    s.set_importance(keys, np.where(keys % R < 8, 100.0, 0.0))
    idx = torch.tensor([R - 1] * (T * B))  # from now on only id R-1 is seen
    for _ in range(20):
        s(idx, torch.arange(T * B + 1)).sum().backward()
        s.step()
    live1 = {(t, v) for t in range(T) for v in range(R) if s.chunks(t, v)}
    protected = {k for k in live0 if k[1] < 8}
    assert protected and protected <= live1, "important stale rows must survive"
    assert {k for k in live0 if 8 <= k[1] < R - 1}.isdisjoint(live1), "stale unimportant rows are evicted"
    assert s.counters["evicted"] > 0 and imp0


def test_gradients_reach_the_right_rows(impl):
    s = impl(T, R, replace(CFG, admit_hits=1, maintain_every=1, resize_every=1000))
    idx, off = torch.tensor([3] * (T * B)), torch.arange(T * B + 1)
    s(idx, off).sum().backward()
    s.step()  # slot 3 of every table admitted (copy of the shared row)
    before = {(t, v): s.row(t, v) for t in range(T) for v in (2, 3)}
    idx = torch.zeros(T * B, dtype=torch.int64)
    idx[B: 2 * B] = 3  # table 1: id 3 in every bag; tables 0 and 2: id 0 (shared)
    out = s(idx, off)
    g = torch.zeros_like(out)
    g[:, CFG.dim + 1] = 1.0  # gradient only on column 1 of table 1
    (out * g).sum().backward()
    s.step()
    after = {(t, v): s.row(t, v) for t in range(T) for v in (2, 3)}
    gsum = np.zeros(CFG.dim, np.float32)
    gsum[1] = B  # B bags hit row (1, 3)
    m = np.mean(gsum[: s.chunks(1, 3) * CFG.chunk_dim] ** 2)  # row-wise: the mean over the row's own width
    want = before[1, 3] - CFG.lr * gsum / (np.sqrt(m) + 1e-8)
    assert np.allclose(after[1, 3], want, atol=1e-6)
    assert np.isclose(s.row_momentum(1, 3), m)
    for k in [(0, 3), (2, 3), (0, 2), (1, 2), (2, 2)]:
        assert np.array_equal(after[k], before[k]), k


def test_checkpoint_round_trip_is_bit_exact(impl):
    a = impl(T, R, CFG)
    train(a, 23)
    buf = io.BytesIO()
    torch.save(a.export_state(), buf)
    b = impl(T, R, CFG)
    b.import_state(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    out_a, out_b = train(a, 12, seed=5), train(b, 12, seed=5)  # crosses maintenance and resize
    assert torch.equal(out_a, out_b)
    assert all(np.array_equal(a.row(t, v), b.row(t, v)) for t in range(T) for v in range(R))
    assert a.counters == b.counters


@pytest.mark.parametrize("admit_hits", [2, 0])
def test_pooled_store_matches_reference(admit_hits):
    cfg = replace(CFG, budget=0.15, ttl_steps=12, admit_hits=admit_hits)
    f, r = FiitedEmbeddings(T, R, cfg), ReferenceStore(T, R, cfg)
    of, orf = train(f, 60, seed=3, hot=40), train(r, 60, seed=3, hot=40)
    assert torch.allclose(of, orf, atol=1e-5)
    policy = lambda c: {k: v for k, v in c.items() if k != "rebuilds"}  # rebuilds: a storage detail
    assert policy(f.counters) == policy(r.counters) and f.counters["resized"] and f.counters["evicted"]
    for t in range(T):
        for v in range(R):
            assert f.chunks(t, v) == r.chunks(t, v), (t, v)
            assert np.allclose(f.row(t, v), r.row(t, v), atol=1e-5), (t, v)


def test_freed_rows_are_reused_and_pools_shrink():
    cfg = replace(CFG, admit_hits=1, ttl_steps=5, protect_quantile=1.0, resize_every=1000, headroom=0.0)
    s = FiitedEmbeddings(T, 4096, cfg)
    rng = np.random.default_rng(0)
    for _ in range(5):  # many distinct ids -> many admissions at step 5
        idx = torch.from_numpy(rng.integers(0, 4096, T * B * 20))
        s(idx, torch.arange(0, T * B * 20 + 1, 20)).sum().backward()
        s.step()
    big = s.memory_report()
    assert big["fiited_admitted"] > 300
    idx = torch.zeros(T * B, dtype=torch.int64)
    for _ in range(10):  # only id 0 is seen: everyone else goes stale and is evicted
        s(idx, torch.arange(T * B + 1)).sum().backward()
        s.step()
    small = s.memory_report()
    assert small["fiited_evicted"] > 300
    pool_bytes = lambda rep: sum(rep[f"fiited_pool_bytes_d{d}"] for d in cfg.pool_dims())
    assert pool_bytes(small) < pool_bytes(big) / 4, "pools compacted: memory freed"
    rows_after = s.pools.live_rows().sum()
    assert rows_after <= 2 * T + 3 and rows_after == (s.pools.caps.sum() - sum(len(f) for fs in s.pools.free
                                                                               for f in fs))


def test_free_list_reuses_rows_and_rebuild_keeps_owners():
    from embedding_store.pools import PoolSet
    ps = PoolSet(np.array([[4, 2]]), (4, 8), lr=0.1)
    rows = ps.alloc(0, 0, np.array([10, 11, 12], np.int32))
    assert rows.tolist() == [0, 1, 2]
    ps.weights(0, 0)[2] = 7.0
    ps.release(0, 0, rows[1:2])
    assert not ps.weights(0, 0)[1].any() and ps.alloc(0, 0, np.array([13], np.int32)).tolist() == [1]
    ps.release(0, 0, rows[:1])
    slots, codes = ps.reserve(np.array([[0, 5]]), headroom=0.0)  # pool (0,1) must grow: rebuild
    assert ps.caps.tolist() == [[4, 5]] and sorted(slots.tolist()) == [12, 13]
    assert ps.weights(0, 0)[int(codes[slots.tolist().index(12)])].tolist() == [7.0] * 4


@pytest.mark.parametrize("indices,offsets,msg", [
    (torch.tensor([0, -1]), torch.tensor([0, 1, 2, 2]), "in \\[0, 64\\)"),
    (torch.tensor([0, 64]), torch.tensor([0, 1, 2, 2]), "got 64"),
    (torch.tensor([0.0, 1.0]), torch.tensor([0, 1, 2, 2]), "int64"),
    (torch.tensor([0, 1]), torch.tensor([0, 1, 2]), "T\\*B\\+1"),
    (torch.tensor([0, 1]), torch.tensor([0, 2, 1, 2]), "non-decreasing"),
])
def test_bad_batches_fail_at_the_edge(impl, indices, offsets, msg):
    with pytest.raises(IdError, match=msg):
        impl(T, R, CFG)(indices, offsets)


@pytest.mark.parametrize("ids,msg", [([1, -3], ">= 0"), ([2**64], "64 bits"), ([1.5], "integers"),
                                     (["7"], "integers"), ([True], "integers"), ("12", "sequence"),
                                     (np.array([1.0]), "integers"), (np.array([-2], np.int64), ">= 0")])
def test_bad_raw_ids_fail_at_the_edge(ids, msg):
    from embedding_store.ids import validate_ids
    with pytest.raises(IdError, match=msg):
        validate_ids(ids, where="ad_id")
    assert validate_ids([0, 2**64 - 1]).tolist() == [0, 2**64 - 1]


def test_trainer_backend_fiited_trains_and_resumes_bit_exactly(tmp_path):
    from config import TrainerConfig
    from test_model import make_examples  # tests/ is on sys.path (rootdir-relative, no package)
    from trainer import checkpoint
    from trainer.features import featurize
    from trainer.model import Learner

    tc = TrainerConfig(hash_buckets=2000, batch_size=128, device="cpu", backend="fiited", embedding_dim=16)
    ex = make_examples(1920)
    batches = [featurize(ex[i:i + 128], tc) for i in range(0, len(ex), 128)] * 4  # 60 steps
    a = Learner(tc)
    for fb in batches[:45]:  # resume before the maintenance pass at step 50
        a.train_step(fb)
    checkpoint.save(tmp_path, a.state(), seq=1)
    b = Learner(tc)
    b.load_state(checkpoint.load(checkpoint.latest(tmp_path)))
    for fb in batches[45:]:
        ra, rb = a.train_step(fb), b.train_step(fb)
        assert np.array_equal(ra.p_click, rb.p_click) and ra.loss == rb.loss
    rep = a.model.emb.memory_report()
    assert rep["fiited_admitted"] > 0 and rep["fiited_memory_ratio"] < 1.0
    for d in a.model.emb.dims:  # the names every backend reports, which the dashboards read
        assert (rep[f"embedding_bytes_d{d}"], rep[f"embedding_rows_d{d}"]) == (rep[f"fiited_pool_bytes_d{d}"],
                                                                             rep[f"fiited_rows_d{d}"])
    assert all(isinstance(v, float) for v in rep.values())  # ServiceStats.values-ready


def test_admit_on_first_lookup_with_room_matches_fixed_tables():
    """admit_hits=0 and a budget with room: every id gets a full row (admission.init_rows) before its first
    lookup, so the store trains exactly like a fixed table initialised the same way."""
    from embedding_store.admission import init_rows

    cfg = replace(CFG, admit_hits=0, budget=1.0, maintain_every=5, resize_every=10)
    f, r = FiitedEmbeddings(T, R, cfg), ReferenceStore(T, R, cfg)
    ref = torch.nn.EmbeddingBag(T * R, CFG.dim, mode="sum", include_last_offset=True)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(init_rows(np.arange(T * R), CFG.dim, CFG.dim, cfg.init_range, cfg.seed)))
    mom = torch.zeros(T * R)
    rng, gen = np.random.default_rng(1), torch.Generator().manual_seed(1)
    for _ in range(12):
        idx, off = batch(rng, hot=R)
        g = torch.randn(B, T * CFG.dim, generator=gen)
        shift = torch.repeat_interleave(torch.arange(T * B) // B * R, off.diff())
        y = ref(idx + shift, off).view(T, B, CFG.dim).transpose(0, 1).reshape(B, -1)
        ys = [s(idx, off) for s in (f, r)]
        assert all(torch.allclose(y, o, atol=1e-6) for o in ys)
        (y * g).sum().backward()
        for o, s in zip(ys, (f, r)):
            (o * g).sum().backward()
            s.step()
        with torch.no_grad():  # row-wise Adagrad by hand on the fixed table
            rows = ref.weight.grad.abs().sum(1).nonzero()[:, 0]
            gr = ref.weight.grad[rows]
            mom[rows] += gr.pow(2).mean(1)
            ref.weight[rows] -= cfg.lr * gr / (mom[rows].sqrt()[:, None] + 1e-8)
            ref.weight.grad = None
    assert f.counters["resized"] == 0 and f.counters["admitted"] == len(f.code.nonzero())
