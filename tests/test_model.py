"""Features, embeddings backends, the MDMO model and bit-exact checkpoints (no broker)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from streams import schema
from config import TrainerConfig
from trainer import checkpoint
from trainer.embeddings import fbgemm_available
from trainer.features import featurize, hash_ids, stable_str_id, table_names
from trainer.model import Learner

BACKENDS = ["torch", *(["fbgemm"] if fbgemm_available() else [])]
TC = TrainerConfig(hash_buckets=5000, batch_size=256, device="cpu")


def make_examples(n: int, seed: int = 0, start: int = 0) -> list[schema.Example]:
    """Examples whose click depends on the ad (30% of ads are good), dense[0] and the domain;
    conversion (given a click) on the advertiser."""
    rng = np.random.default_rng(seed)
    ads = rng.integers(0, 300, n)
    d0 = rng.normal(size=n)
    dom = rng.integers(0, len(schema.DOMAINS), n)
    logit = -1.2 + 2.2 * (ads % 10 < 3) + 0.8 * d0 + 0.3 * (dom == 1)
    click = rng.random(n) < 1 / (1 + np.exp(-logit))
    conv = click & (rng.random(n) < np.where(ads % 7 < 2, 0.6, 0.1))
    out = []
    for i in range(n):
        ad = int(ads[i])
        imp = schema.Impression(
            event_id=f"i{start + i}", ts=1_700_000_000_000 + start + i, user_id=int(rng.integers(0, 2000)),
            ad_id=ad, campaign_id=ad // 3, advertiser_id=ad // 15, domain=schema.DOMAINS[int(dom[i])],
            position=int(i % 5), device=schema.DEVICES[i % 4], country=("US", "DE", "")[i % 3],
            cat=[int(x) for x in rng.integers(0, 50, i % 4)], dense=[float(d0[i]), float(i % 7), -3.5],
            history=[int(x) for x in rng.integers(0, 300, i % 12)])
        out.append(schema.Example(example_id=f"e{start + i}", impression=imp, click=int(click[i]),
                                  conversion=int(conv[i]), weight=1.0, emitted_ts=1_700_000_000_000 + start + i))
    return out


def test_feature_layout_deterministic_and_in_range():
    exs = make_examples(300)
    a, b = featurize(exs, TC), featurize(exs, TC)
    np.testing.assert_array_equal(a.indices, b.indices)
    t, n = len(table_names(TC)), len(exs)
    assert a.num_tables == t and a.offsets.shape == (t * n + 1,)
    assert a.offsets[0] == 0 and a.offsets[-1] == len(a.indices) and (np.diff(a.offsets) >= 0).all()
    assert a.indices.min() >= 0 and a.indices.max() < TC.hash_buckets
    lengths = np.diff(a.offsets).reshape(t, n)
    assert (lengths[:7] == 1).all()  # single-valued fields
    assert lengths[-1].tolist() == [min(i % 12, TC.history_len) for i in range(n)]  # history bag
    assert lengths[7].tolist() == [int(i % 4 > 0) for i in range(n)]  # cat_0 present only when cat non-empty
    # dense: linear within +-3, logarithmic beyond (trainer.features.soft_log); column 1 is i % 7
    assert a.dense.shape == (n, TC.dense_dim) and np.isclose(a.dense[0, 2], -(3 + np.log1p(0.5)))
    assert a.dense[2, 1] == 2.0 and np.isclose(a.dense[5, 1], 3 + np.log1p(2))
    assert (a.dense[:, 3:] == 0).all()
    # golden values: identical in every process (no salted hash()), so checkpoints stay valid across restarts
    ids = np.array([0, 1, 2**63 - 1], dtype=np.uint64)
    assert hash_ids(ids, np.array([0, 0, 3]), 100_000).tolist() == [7535, 43936, 18933]
    assert stable_str_id("US") == 3722827865273741214 and stable_str_id("US") != stable_str_id("DE")
    # the same raw id lands on different rows in different tables
    same = hash_ids(np.full(5, 42, dtype=np.uint64), np.arange(5), 1 << 30)
    assert len(set(same.tolist())) == 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_shapes(backend):
    learner = Learner(msgspec_replace(TC, backend=backend))
    fb = featurize(make_examples(37), learner.tcfg)
    pc, pv = learner.score(fb)
    assert pc.shape == (37,) and pv.shape == (37,)
    assert ((pc > 0) & (pc < 1)).all() and (pv <= pc).all()  # ESMM: p(conversion) = pCTR * pCVR <= pCTR


@pytest.mark.skipif("fbgemm" not in BACKENDS, reason="fbgemm_gpu not importable")
@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_tables_report_the_memory_their_tensors_hold(backend):
    # the embedding-memory panels read embedding_bytes_d<width> / embedding_rows_d<width> from every backend
    emb = Learner(msgspec_replace(TC, backend=backend)).model.emb
    held = ([emb.bag.weight, emb.momentum] if backend == "torch" else
            [getattr(emb.tbe, f"{k}_{w}") for k in ("weights", "momentum1") for w in ("host", "dev", "uvm")])
    d, rows = TC.embedding_dim, emb.num_tables * TC.hash_buckets
    assert emb.memory_report() == {f"embedding_bytes_d{d}": float(sum(t.nbytes for t in held)),
                                   f"embedding_rows_d{d}": float(rows)}


def test_fbgemm_and_torch_backends_agree():
    fl = Learner(msgspec_replace(TC, backend="fbgemm"))
    tl = Learner(msgspec_replace(TC, backend="torch"))
    tl.load_state(fl.state())  # same weights and optimizer states, cross-backend checkpoint format
    w0 = fl.model.emb.export_state()["weights"]
    exs = make_examples(512)
    for i in range(3):  # forward equal, and the row-wise Adagrad updates equal too
        fb = featurize(exs[i * 128:(i + 1) * 128], TC)
        rf, rt = fl.train_step(fb), tl.train_step(fb)
        np.testing.assert_allclose(rf.p_click, rt.p_click, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(rf.p_conversion, rt.p_conversion, rtol=1e-5, atol=1e-6)
    sf, st = fl.model.emb.export_state(), tl.model.emb.export_state()
    assert not torch.equal(sf["weights"], w0) and (sf["momentum"] > 0).sum() > 100  # the updates did happen
    torch.testing.assert_close(sf["weights"], st["weights"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sf["momentum"], st["momentum"], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_learns_synthetic_signal(backend):
    tc = msgspec_replace(TC, backend=backend)
    learner = Learner(tc)
    exs = make_examples(150 * 128, seed=1)
    scores, clicks, conv_scores, convs = [], [], [], []
    for i in range(150):
        fb = featurize(exs[i * 128:(i + 1) * 128], tc)
        r = learner.train_step(fb)  # progressive validation: scored before learning from the batch
        if i >= 100:
            scores.append(r.p_click), clicks.append(fb.click)
            conv_scores.append(r.p_conversion), convs.append(fb.conversion)
    auc = roc_auc_score(np.concatenate(clicks), np.concatenate(scores))
    auc_conv = roc_auc_score(np.concatenate(convs), np.concatenate(conv_scores))
    assert auc > 0.72, auc  # random scores give 0.5
    assert auc_conv > 0.66, auc_conv


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_round_trip_bit_exact(backend, tmp_path):
    tc = msgspec_replace(TC, backend=backend)
    a = Learner(tc)
    exs = make_examples(128 * 6, seed=2)
    fbs = [featurize(exs[i * 128:(i + 1) * 128], tc) for i in range(6)]
    for fb in fbs[:4]:
        a.train_step(fb)
    path = checkpoint.save(tmp_path, {"learner": a.state()}, seq=1)
    b = Learner(msgspec_replace(tc, seed=123))  # different init: everything must come from the file
    b.load_state(checkpoint.load(path)["learner"])
    _assert_states_equal(a.state(), b.state())
    for fb in fbs[4:]:  # the next outputs and updates are identical, not just close
        ra, rb = a.train_step(fb), b.train_step(fb)
        assert np.array_equal(ra.p_click, rb.p_click) and np.array_equal(ra.p_conversion, rb.p_conversion)
    _assert_states_equal(a.state(), b.state())
    # keep only the last 2 files, atomically replaced
    for seq in (2, 3):
        checkpoint.save(tmp_path, {"learner": a.state()}, seq=seq)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["ckpt-000000000002.pt", "ckpt-000000000003.pt"]
    assert not list(tmp_path.glob("*.tmp"))


def _assert_states_equal(x, y, where="state"):
    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), where
    elif isinstance(x, dict):
        assert x.keys() == y.keys(), where
        for k in x:
            _assert_states_equal(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            _assert_states_equal(u, v, f"{where}[{i}]")
    else:
        assert x == y, where


def msgspec_replace(tc: TrainerConfig, **kw) -> TrainerConfig:
    import msgspec

    return msgspec.structs.replace(tc, **kw)


def test_a_checkpoint_from_other_model_settings_is_a_clear_error():
    from config import TrainerConfig
    from trainer.model import Learner

    st = Learner(TrainerConfig(hash_buckets=100, device="cpu", backend="torch", user_model=True)).state()
    other = Learner(TrainerConfig(hash_buckets=100, device="cpu", backend="torch", user_model=False))
    with pytest.raises(ValueError, match="other trainer settings .*user_model.*size mismatch"):
        other.load_state(st)
    # a checkpoint of an older model version: same shapes could mean other things; refused by version
    old = Learner(TrainerConfig(hash_buckets=100, device="cpu", backend="torch", user_model=False))
    st = old.state()
    del st["model_version"]
    with pytest.raises(ValueError, match="model version 1, this streamrec trains version 2.*--fresh"):
        old.load_state(st)
