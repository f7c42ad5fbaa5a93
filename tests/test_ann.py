"""Contract tests: one body over the numpy reference and every FAISS kind (STYLE #10/#11)."""

from __future__ import annotations

import numpy as np
import pytest

from embedding_store.ann import (AnnConfig, AnnError, load_index, make_index, normalize, read_snapshot, save_index,
                                  save_npz_atomic)
from embedding_store.ann_faiss import TWO_LEVEL_ABOVE, FaissIndex, train_centroids

DIM = 8
# ivf with nprobe == nlist scans every list: exact answers, so the same assertions hold
KINDS = {
    "numpy": AnnConfig(dim=DIM, kind="numpy"),
    "exact": AnnConfig(dim=DIM, kind="exact"),
    "ivf": AnnConfig(dim=DIM, kind="ivf", nlist=4, nprobe=4),
    "ivf-hnsw": AnnConfig(dim=DIM, kind="ivf", nlist=4, nprobe=4, quantizer="hnsw", hnsw_m=4),
    "ivf-fp16": AnnConfig(dim=DIM, kind="ivf", nlist=4, nprobe=4, quantizer="hnsw", hnsw_m=4, codec="fp16"),
}
# fp16 lists hold vectors to ~1e-3: stored vectors compare with that tolerance
ATOL = {"ivf-fp16": 2e-3}


def _make(kind: str, trained: bool = True):
    idx = make_index(KINDS[kind])
    if KINDS[kind].kind == "ivf" and trained:
        idx.train(np.random.default_rng(9).normal(size=(200, DIM)))
    return idx


def _brute(ref: dict[int, np.ndarray], q: np.ndarray, k: int) -> list[list[int]]:
    ids = np.array(sorted(ref))
    m = normalize(np.stack([ref[i] for i in ids]))
    s = normalize(q) @ m.T
    return [ids[np.argsort(-row, kind="stable")[:k]].tolist() for row in s]


@pytest.fixture(params=[*KINDS, "ivf-staging"])
def kind(request):
    return request.param


def make(kind):
    return _make("ivf", trained=False) if kind == "ivf-staging" else _make(kind)


def test_upsert_replaces_and_search_matches_brute_force(kind):
    rng = np.random.default_rng(0)
    idx = make(kind)
    ref = {}
    for step in range(6):  # inserts, replacements (overlapping ids) and deletes, checked against a dict
        ids = rng.choice(300, 60, replace=False)
        v = rng.normal(size=(60, DIM))
        idx.upsert(ids, v, ts_ms=1000 + step)
        ref.update(zip(ids.tolist(), v))
        gone = rng.choice(300, 20, replace=False)
        assert idx.delete(gone) == sum(1 for g in gone.tolist() if g in ref)
        for g in gone.tolist():
            ref.pop(g, None)
    assert len(idx) == len(ref) and set(idx.ids().tolist()) == set(ref)
    q = rng.normal(size=(20, DIM))
    scores, got = idx.search(q, 5)
    want = _brute(ref, q, 5)
    if kind == "ivf-fp16":  # half-float scores may swap near-ties: compare as sets, allow one swap per row
        assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(got.tolist(), want)]) >= 0.95
    else:
        assert got.tolist() == want
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    some = np.array(sorted(ref)[:10])
    np.testing.assert_allclose(idx.get(some), normalize(np.stack([ref[i] for i in some.tolist()])),
                               atol=ATOL.get(kind, 1e-5))


def test_replaced_vector_is_found_under_its_new_value_only(kind):
    idx = make(kind)
    base = np.eye(DIM)
    idx.upsert(np.arange(DIM), base, ts_ms=1)
    idx.upsert(np.array([3]), -base[[3]], ts_ms=2)  # user 3 turns around
    _, ids = idx.search(base[[3]], 1)
    assert ids[0, 0] != 3
    _, ids = idx.search(-base[[3]], 1)
    assert ids[0, 0] == 3
    assert len(idx) == DIM
    assert idx.written_ts(np.array([3, 4, 99])).tolist() == [2, 1, -1]


def test_duplicate_ids_in_one_call_keep_the_last(kind):
    idx = make(kind)
    v = np.eye(DIM)[:3]
    idx.upsert(np.array([5, 6, 5]), v, ts_ms=np.array([10, 11, 12]))
    assert len(idx) == 2
    np.testing.assert_allclose(idx.get(np.array([5]))[0], v[2], atol=ATOL.get(kind, 1e-6))
    assert idx.written_ts(np.array([5])).tolist() == [12]


def test_search_pads_when_k_exceeds_size_and_on_empty(kind):
    idx = make(kind)
    scores, ids = idx.search(np.ones((2, DIM)), 3)
    assert ids.tolist() == [[-1] * 3] * 2 and np.isneginf(scores).all()
    idx.upsert(np.array([1, 2]), np.eye(DIM)[:2], ts_ms=1)
    scores, ids = idx.search(np.ones((1, DIM)), 4)
    assert sorted(ids[0, :2].tolist()) == [1, 2] and ids[0, 2:].tolist() == [-1, -1]
    assert np.isneginf(scores[0, 2:]).all()


def test_deleted_ids_leave_search_get_and_snapshots_and_can_come_back(kind, tmp_path):
    # how users leave after their TTL (trainer/users/service.py): delete, then maybe upsert again later
    rng = np.random.default_rng(3)
    idx = make(kind)
    ids = np.arange(100, 160)
    v = rng.normal(size=(60, DIM))
    idx.upsert(ids, v, ts_ms=np.arange(60) + 1)
    gone, kept = ids[:40], ids[40:]
    assert idx.delete(np.concatenate([gone, [9999]])) == 40 and idx.delete(gone) == 0
    assert len(idx) == 20 and sorted(idx.ids().tolist()) == kept.tolist()
    assert (idx.written_ts(gone) == -1).all() and not any(int(g) in idx for g in gone)
    with pytest.raises(AnnError, match="not in the index"):
        idx.get(gone[:1])
    _, got = idx.search(v[:40], 20)  # k = everything left: only kept ids, each once
    assert all(sorted(row) == kept.tolist() for row in got.tolist())
    back = load_index(save_index(idx, tmp_path / "index"), kind="numpy")
    assert sorted(back.ids().tolist()) == kept.tolist()
    idx.upsert(gone[:5], -v[:5], ts_ms=1000)  # users who come back: new vectors, new times
    assert len(idx) == 25 and idx.written_ts(gone[:6]).tolist() == [1000] * 5 + [-1]
    _, got = idx.search(-v[:5], 1)
    assert got[:, 0].tolist() == gone[:5].tolist()
    assert idx.delete(idx.ids()) == 25 and len(idx) == 0  # down to empty, and searches still answer
    assert idx.search(v[:1], 3)[1].tolist() == [[-1, -1, -1]]


def test_snapshot_round_trip_within_and_across_kinds(kind, tmp_path):
    rng = np.random.default_rng(1)
    idx = make(kind)
    ids = rng.choice(10_000, 150, replace=False)
    idx.upsert(ids, rng.normal(size=(150, DIM)), ts_ms=rng.integers(1, 10**12, 150))
    idx.delete(ids[:10])
    path = save_index(idx, tmp_path / "users" / "index")
    q = rng.normal(size=(10, DIM))
    want = idx.search(q, 5)[1]
    for other in (None, "numpy", "exact", "ivf"):
        back = load_index(path, kind=other)
        assert len(back) == len(idx)
        assert back.search(q, 5)[1].tolist() == want.tolist(), other
        assert back.written_ts(ids).tolist() == idx.written_ts(ids).tolist()


def test_bad_input_names_the_mismatch(kind):
    idx = make(kind)
    with pytest.raises(AnnError, match=r"upsert: expected vectors of shape \(2, 8\), got \(2, 3\)"):
        idx.upsert(np.array([1, 2]), np.zeros((2, 3)), ts_ms=0)
    with pytest.raises(AnnError, match="ids must be >= 0"):
        idx.upsert(np.array([-1]), np.zeros((1, DIM)), ts_ms=0)
    with pytest.raises(AnnError, match="NaN"):
        idx.upsert(np.array([1]), np.full((1, DIM), np.nan), ts_ms=0)
    with pytest.raises(AnnError, match="not in the index"):
        idx.get(np.array([42]))
    assert len(idx) == 0


def test_hnsw_is_refused_and_unknown_kinds_named():
    with pytest.raises(ValueError, match="hnsw.*cannot delete"):
        make_index(AnnConfig(kind="hnsw"))
    with pytest.raises(ValueError, match="kind"):
        make_index(AnnConfig(kind="lsh"))


def test_ivf_trains_itself_once_enough_vectors_are_staged():
    idx = make_index(AnnConfig(dim=DIM, kind="ivf", nlist=4, nprobe=4))
    rng = np.random.default_rng(2)
    idx.upsert(np.arange(100), rng.normal(size=(100, DIM)), ts_ms=1)
    assert isinstance(idx, FaissIndex) and not idx.trained
    idx.upsert(np.arange(100, 130), rng.normal(size=(30, DIM)), ts_ms=1)  # 130 >= 30 * nlist
    assert idx.trained and len(idx) == 130
    assert idx.delete(np.arange(50)) == 50 and len(idx) == 80
    _, ids = idx.search(idx.get(np.array([77])), 1)
    assert ids[0, 0] == 77


def test_users_cli_similar_lookalike_info(tmp_path, capsys):
    from deploy.cli import main

    idx = make_index(AnnConfig(dim=DIM, kind="exact"))
    v = np.eye(DIM)
    v[1] = v[0] + 0.1 * v[1]  # user 2 is user 1's nearest neighbour
    idx.upsert(np.arange(1, DIM + 1), v, ts_ms=1_700_000_000_000)
    path = save_index(idx, tmp_path / "users" / "index")
    assert main(["users", "--index", str(path), "similar", "1", "-k", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("users similar to 1: 3 of 8 users") and out[2].split()[:2] == ["1", "2"]
    assert "2023-11-14" in out[2]  # written time of the vector, and its age beside it
    assert main(["users", "--index", str(path), "--kind", "numpy", "lookalike", "1", "2", "99", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "lookalike of 2 seed users (1 without a vector: [99])" in out
    assert main(["users", "--index", str(path), "similar", "99"]) == 1
    assert "user 99 has no vector" in capsys.readouterr().err
    assert main(["users", "--index", str(tmp_path / "none"), "info"]) == 2
    capsys.readouterr()
    ivf = _make("ivf-hnsw")
    ivf.upsert(np.arange(1, DIM + 1), v, ts_ms=1_700_000_000_000)
    assert main(["users", "--index", str(save_index(ivf, tmp_path / "ivf")), "info"]) == 0
    assert "8 users, dim 8, kind ivf, nlist 4, nprobe 4, hnsw quantizer" in capsys.readouterr().out


def _clustered(n: int, rng, dim: int = DIM) -> np.ndarray:
    c = rng.normal(size=(max(n // 50, 1), dim))
    return c[rng.integers(0, len(c), n)] + 0.3 * rng.normal(size=(n, dim))


@pytest.mark.parametrize("nlist", [64, TWO_LEVEL_ABOVE + 60])
def test_train_centroids_gives_nlist_unit_rows(nlist):
    x = normalize(_clustered(5000, np.random.default_rng(3)))
    c = train_centroids(x, nlist)
    assert c.shape == (nlist, DIM)
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-4)
    assert len(np.unique(c.round(5), axis=0)) > 0.9 * nlist  # not collapsed onto a few points


def test_hnsw_quantizer_with_many_lists_upserts_deletes_and_finds_neighbours(tmp_path):
    """Two-level trained IVF with an HNSW quantizer (the 1M configuration, scaled down): replacements and
    deletes go through the lists, recall@10 against brute force stays high, the snapshot keeps the
    centroids (no retraining) and the quantizer kind."""
    rng = np.random.default_rng(4)
    n, nlist = 12_000, TWO_LEVEL_ABOVE + 100
    x = _clustered(n, rng)
    idx = make_index(AnnConfig(dim=DIM, kind="ivf", nlist=nlist, nprobe=32, quantizer="hnsw", hnsw_m=16))
    idx.train(x)
    assert idx.trained and idx._ivf.quantizer.ntotal == nlist
    ids = np.arange(n) * 3 + 1
    idx.upsert(ids, x, ts_ms=1)
    idx.upsert(ids[:500], -x[:500], ts_ms=2)  # turned around
    assert idx.delete(ids[500:1000]) == 500 and len(idx) == n - 500
    _, got = idx.search(-x[:20], 1)
    assert got[:, 0].tolist() == ids[:20].tolist()
    _, got = idx.search(x[500:520], 5)
    assert not np.isin(got, ids[500:1000]).any()
    live = {int(i): v for i, v in zip(ids, np.concatenate([-x[:500], x[500:]]))}
    for i in ids[500:1000].tolist():
        del live[i]
    q = x[rng.integers(1000, n, 200)] + 0.1 * rng.normal(size=(200, DIM))
    want = _brute(live, q, 10)
    _, got = idx.search(q, 10)
    rec = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.tolist(), want)])
    assert rec >= 0.9, rec
    idx.set_search_params(nprobe=1, ef_search=4)
    _, got1 = idx.search(q, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got1.tolist(), want)]) < rec  # the knob is live
    idx.set_search_params(nprobe=32, ef_search=0)
    path = save_index(idx, tmp_path / "index")
    back = load_index(path)
    assert back.cfg.quantizer == "hnsw" and back.cfg.nlist == nlist and len(back) == len(idx)
    np.testing.assert_array_equal(back.centroids(), idx.centroids())
    assert back.search(q, 10)[1].tolist() == got.tolist()


def test_set_search_params_is_recorded_and_checked():
    idx = _make("ivf-hnsw")
    idx.set_search_params(nprobe=3, ef_search=7)
    assert (idx.cfg.nprobe, idx.cfg.ef_search, idx._ivf.nprobe, idx._hnsw.hnsw.efSearch) == (3, 7, 3, 7)
    idx.set_search_params(nprobe=4, ef_search=2)  # a beam narrower than nprobe would drop lists: raised
    assert idx._hnsw.hnsw.efSearch == 4
    snap_meta = read_snapshot_meta(idx)
    assert (snap_meta["nprobe"], snap_meta["ef_search"]) == (4, 2)
    with pytest.raises(ValueError, match="nprobe must be >= 1"):
        idx.set_search_params(nprobe=0)
    with pytest.raises(ValueError, match="quantizer"):
        make_index(AnnConfig(kind="ivf", quantizer="pq"))
    with pytest.raises(ValueError, match="codec"):
        make_index(AnnConfig(kind="ivf", codec="sq4"))


def read_snapshot_meta(idx) -> dict:
    import json

    return json.loads(idx.snapshot()["meta"].tobytes())


def test_snapshot_without_the_newer_config_fields_still_loads(tmp_path):
    import json

    idx = _make("ivf")
    idx.upsert(np.arange(50), np.random.default_rng(5).normal(size=(50, DIM)), ts_ms=1)
    snap = idx.snapshot()
    meta = json.loads(snap["meta"].tobytes())
    for k in ("quantizer", "hnsw_m", "ef_search", "ef_add", "codec"):
        del meta[k]
    snap["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    path = save_npz_atomic(tmp_path / "old", snap)
    assert read_snapshot(path)[1]["kind"] == "ivf"
    back = load_index(path)
    assert back.cfg.quantizer == "flat" and len(back) == 50


def test_fp16_lists_store_half_floats_and_rank_like_float_lists():
    """fp16 lists: the same neighbours as float lists on clustered data (recall@10 >= 0.98 against them),
    vectors back to ~1e-3, and the FAISS index really is the scalar-quantizer kind."""
    rng = np.random.default_rng(6)
    x = _clustered(3000, rng)
    q = x[:300] + 0.05 * rng.normal(size=(300, DIM))
    out = {}
    for codec in ("flat", "fp16"):
        idx = make_index(AnnConfig(dim=DIM, kind="ivf", nlist=16, nprobe=16, codec=codec))
        idx.train(x)
        idx.upsert(np.arange(3000), x, ts_ms=1)
        idx.upsert(np.arange(100), x[100:200], ts_ms=2)
        out[codec] = (idx, idx.search(q, 10)[1])
    assert type(out["fp16"][0]._ivf).__name__ == "IndexIVFScalarQuantizer"
    assert type(out["flat"][0]._ivf).__name__ == "IndexIVFFlat"
    a, b = out["flat"][1], out["fp16"][1]
    assert np.mean([len(set(p) & set(q)) / 10 for p, q in zip(a.tolist(), b.tolist())]) >= 0.98
    got = out["fp16"][0].get(np.arange(200))
    np.testing.assert_allclose(got, normalize(np.concatenate([x[100:200], x[100:200]])), atol=2e-3)
    assert np.abs(got - normalize(np.concatenate([x[100:200], x[100:200]]))).max() > 0  # really half floats
