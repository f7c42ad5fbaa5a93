"""FIITED memory that follows the live rows: the slot map, the admission sketch, metadata bytes, ``live_budget``
and the state format (version 2, version 1 converted). In-process, tiny tables."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch

from embedding_store.config import FiitedConfig
from embedding_store.fiited import STATE_VERSION, FiitedEmbeddings
from embedding_store.reference import ReferenceStore
from embedding_store.slotmap import CountMinSketch, SlotMap

T, B = 3, 8
CFG = FiitedConfig(chunk_dim=4, num_chunks=4, pool_chunks=(1, 2, 4), budget=0.5, maintain_every=5,
                   resize_every=10, admit_hits=1, ttl_steps=1000, lr=0.1)


def train(store, steps: int, ids: np.ndarray, seed: int = 0) -> torch.Tensor:
    """``steps`` updates on bags of one id each drawn from ``ids``, with a fixed random upstream gradient."""
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    out = None
    for _ in range(steps):
        idx = torch.from_numpy(rng.choice(ids, T * B).astype(np.int64))
        out = store(idx, torch.arange(T * B + 1))
        (out * torch.randn(out.shape, generator=gen)).sum().backward()
        store.step()
    return out


def test_slot_map_agrees_with_a_dict_through_inserts_deletes_and_rehashes():
    rng = np.random.default_rng(0)
    m, ref = SlotMap(), {}
    for it in range(60):
        new = np.unique(rng.integers(0, 2**31 - 1, rng.integers(1, 400)))
        vals = rng.integers(0, 2**31 - 1, len(new))
        m.put(new, vals)
        ref.update(zip(new.tolist(), vals.tolist()))
        if it % 3 == 2:  # delete about half of the keys, some absent ones too
            gone = np.concatenate([rng.choice(list(ref), len(ref) // 2, replace=False), [2**31 - 2]])
            m.delete(gone)
            for k in gone.tolist():
                ref.pop(k, None)
            m.compact()
        probe = np.concatenate([np.array(list(ref), dtype=np.int64), rng.integers(0, 2**31 - 1, 200)])
        want = [ref.get(k, -1) for k in probe.tolist()]
        assert m.get(probe).tolist() == want and len(m) == len(ref)
        assert len(ref) <= 0.6 * m.capacity and m.nbytes == 8 * m.capacity
        assert m.capacity <= max(64, 4 * len(ref) / 0.45)  # shrinks after mass deletion
    k, v = m.items()
    assert dict(zip(k.tolist(), v.tolist())) == ref


def test_slot_map_turns_dense_when_most_keys_are_live_and_back_when_they_leave():
    rng = np.random.default_rng(3)
    u = 4096
    m, ref = SlotMap(universe=u), {}
    modes = []
    for it in range(40):
        if it < 20:
            new = rng.choice(u, 200, replace=False)
            m.put(new, new * 7 % 1000)
            ref.update(zip(new.tolist(), (new * 7 % 1000).tolist()))
        else:  # drain: delete most keys
            gone = rng.choice(list(ref), max(len(ref) // 3, 1), replace=False)
            m.delete(np.concatenate([gone, gone[:3]]))  # repeats and absent keys are ignored
            for k in gone.tolist():
                ref.pop(k)
            m.compact()
        modes.append(m.dense is not None)
        q = np.arange(u)
        assert m.get(q).tolist() == [ref.get(k, -1) for k in range(u)] and len(m) == len(ref)
        assert m.nbytes <= max(4 * u, 8 * 64) and (m.dense is None or m.nbytes == 4 * u)
    assert not modes[0] and True in modes and not modes[-1]  # hashed, dense while full, hashed again


def test_count_min_sketch_never_undercounts_ages_and_saturates():
    rng = np.random.default_rng(1)
    keys = rng.zipf(1.3, 5000) % 3000
    s = CountMinSketch(width=512, depth=2)
    s.add(keys)
    true = np.bincount(keys, minlength=3000)
    est = s.estimate(np.arange(3000))
    assert (est >= np.minimum(true, 255)).all() and (est[true == 0] < est.max()).all()
    assert (est <= 255).all() and est.max() == 255  # saturating uint8
    s.halve()
    assert (s.estimate(np.arange(3000)) == est // 2).all() or (s.estimate(np.arange(3000)) <= est // 2 + 1).all()
    assert s.nbytes == 2 * 512


def test_metadata_follows_the_admitted_rows_not_the_virtual_slots():
    ids = np.arange(40)
    cfg = replace(CFG, budget=1.0)  # room for every id in both
    small, big = FiitedEmbeddings(T, 64, cfg), FiitedEmbeddings(T, 200_000, cfg)
    train(small, 12, ids), train(big, 12, ids)
    assert [small.chunks(t, v) for t in range(T) for v in ids] == [big.chunks(t, v) for t in range(T) for v in ids]
    rs, rb = small.memory_report(), big.memory_report()
    assert rs["fiited_admitted_rows"] == rb["fiited_admitted_rows"] > 0.8 * T * len(ids)
    assert rs["fiited_row_meta_bytes"] == rb["fiited_row_meta_bytes"]
    # the small table's slots are mostly live: a plain array is smaller than a hash table; the big one hashes
    assert small.slotmap.dense is not None and rs["fiited_map_bytes"] == 4 * T * 64
    assert big.slotmap.dense is None and rb["fiited_map_bytes"] < 40 * rb["fiited_admitted_rows"]
    # the old dense layout (20 B per virtual slot) would cost 12 MB here; this is a few kB
    assert rb["fiited_meta_bytes"] < 10_000 and rb["fiited_total_bytes"] < 0.001 * rb["fiited_fixed_bytes"]
    assert rb["fiited_meta_bytes"] == (rb["fiited_map_bytes"] + rb["fiited_row_meta_bytes"]
                                       + rb["fiited_sketch_bytes"] + 4 * int(big.pools.caps.sum())
                                       + 4 * sum(len(f) for ts in big.pools.free for f in ts))


@pytest.mark.parametrize("impl", [FiitedEmbeddings, ReferenceStore])
def test_one_hit_ids_stay_on_the_shared_row_until_the_sketch_counts_a_second_sighting(impl):
    s = impl(T, 64, replace(CFG, admit_hits=2, sketch_width=4096))
    off = torch.arange(T * B + 1)
    first = torch.arange(T * B) % 64  # ids 0..23, each once per table row of bags
    s(first, off).sum().backward()
    s.step()
    assert all(s.chunks(t, v) == 0 for t in range(T) for v in range(24))  # one sighting: still sharing
    fresh = 30 + torch.arange(T * B)  # each seen once
    again = torch.where(torch.arange(T * B) % 2 == 0, first, fresh)  # even bags repeat their id
    s(again, off).sum().backward()
    s.step()
    for t in range(T):
        for b in range(B):
            v = t * B + b
            assert (s.chunks(t, v) > 0) == (b % 2 == 0), (t, v)  # seen twice: own row; once: sharing
            assert s.chunks(t, int(fresh[v])) == 0


def test_live_budget_bounds_private_bytes_by_the_admitted_rows():
    cfg = replace(CFG, budget=1.0, live_budget=0.4, admit_hits=0)
    s = FiitedEmbeddings(T, 64, cfg)
    rng, gen = np.random.default_rng(2), torch.Generator().manual_seed(2)
    full = 4 * (cfg.dim + 1)
    for _ in range(30):
        idx = torch.from_numpy(np.minimum(rng.zipf(1.3, T * B) - 1, 63).astype(np.int64))
        out = s(idx, torch.arange(T * B + 1))
        (out * torch.randn(out.shape, generator=gen)).sum().backward()
        s.step()
        rep = s.memory_report()
        n = rep["fiited_admitted_rows"]
        used = sum(rep[f"fiited_rows_d{d}"] * 4 * (d + 1) for d in cfg.pool_dims())
        assert 0 < used <= 0.4 * n * full + 1e-6
    assert s.counters["resized"] > 0 and {s.chunks(t, v) for t in range(T) for v in range(64)} - {0} != {4}


def _v1(state: dict, n: int) -> dict:
    """A version-1 export (dense per-slot arrays) of the same store, as older streamrec wrote it."""
    code, last = np.zeros(n, np.int32), np.zeros(n, np.int32)
    imp, snap = np.zeros(n, np.float32), np.zeros(n, np.float32)
    slot = state["meta.slot"].numpy()
    code[slot], last[slot] = state["meta.code"].numpy(), state["meta.last"].numpy()
    imp[slot], snap[slot] = state["meta.imp"].numpy(), state["meta.snap"].numpy()
    out = {k: v for k, v in state.items() if not k.startswith("meta.") and k != "sketch"}
    out.update(fiited_version=torch.tensor(1), code=torch.from_numpy(code), hits=torch.zeros(n, dtype=torch.int32),
               last_seen=torch.from_numpy(last), imp=torch.from_numpy(imp), snap=torch.from_numpy(snap))
    return out


def test_state_round_trips_and_version_1_is_converted_and_others_refused():
    ids = np.arange(50)
    a = FiitedEmbeddings(T, 64, CFG)
    train(a, 17, ids)
    st = a.export_state()
    assert int(st["fiited_version"]) == STATE_VERSION == 2 and len(st["meta.slot"]) == a.memory_report()[
        "fiited_admitted_rows"]
    buf = io.BytesIO()
    torch.save(st, buf)
    b, c = FiitedEmbeddings(T, 64, CFG), FiitedEmbeddings(T, 64, CFG)
    b.import_state(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    c.import_state(_v1(st, T * 64))
    outs = [train(x, 14, ids, seed=4) for x in (a, b, c)]  # crosses maintenance, resize and eviction passes
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert torch.equal(a.code, b.code) and torch.equal(a.code, c.code) and a.counters == c.counters
    bad = dict(st, fiited_version=torch.tensor(9))
    with pytest.raises(ValueError, match="version 9 is not one this store reads"):
        FiitedEmbeddings(T, 64, CFG).import_state(bad)
