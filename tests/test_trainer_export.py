"""Serving export (versioned artifact + `streamrec score --model`) and device / backend selection (no broker)."""

from __future__ import annotations

import argparse
import json

import msgspec
import numpy as np
import pytest
import torch

from streams import schema
from config import TrainerConfig, load_config, replace
from trainer import embeddings, export, score
from trainer.features import featurize
from trainer.model import Learner
from test_model import make_examples

TC = TrainerConfig(hash_buckets=2000, batch_size=128, device="cpu")


def _assert_scores_like(learner: Learner, exs, p_click, p_conversion) -> None:
    """The scores equal what ``learner`` itself gives ``exs`` (float tolerance: other summation orders)."""
    want = learner.score(featurize(exs, learner.tcfg))
    np.testing.assert_allclose(p_click, want[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(p_conversion, want[1], rtol=1e-5, atol=1e-7)


def _trained(n_steps: int = 3, **kw) -> Learner:
    learner = Learner(msgspec.structs.replace(TC, **kw))
    exs = make_examples(128 * n_steps, seed=3)
    for i in range(n_steps):
        learner.train_step(featurize(exs[i * 128:(i + 1) * 128], learner.tcfg))
    return learner


def test_export_round_trip_scores_identically_and_is_versioned(tmp_path):
    learner = _trained()
    root = tmp_path / "models"
    v3 = export.export(learner, root, examples_trained=384)
    assert v3.name == "v000000000003" and (root / "LATEST").read_text().strip() == v3.name
    meta = json.loads((v3 / "version.json").read_text())
    assert meta["model_version"] == 3 and meta["examples_trained"] == 384 and meta["format"] == export.EXPORT_FORMAT
    assert json.loads((v3 / "features.json").read_text())["tables"][0] == "user_id"
    widths = torch.load(v3 / "model.pt", weights_only=True)["embedding_widths"]  # fixed tables: every row D wide
    assert widths.shape == (learner.model.emb.num_tables, TC.hash_buckets) and (widths == TC.embedding_dim).all()
    m = export.load(root, device="cpu", backend="torch")  # a different backend than training reads it too
    exs = make_examples(50, seed=9)
    rows = score.score_impressions(m, [e.impression for e in exs])
    _assert_scores_like(learner, exs, [r.p_click for r in rows], [r.p_conversion for r in rows])
    # a newer version becomes LATEST; old ones stay loadable by directory; only `keep` are kept
    learner.train_step(featurize(exs, learner.tcfg))
    v4 = export.export(learner, root, keep=2)
    assert export.load(root, device="cpu").steps == 4 and export.load(v3, device="cpu").steps == 3
    learner.train_step(featurize(exs, learner.tcfg))
    export.export(learner, root, keep=2)
    assert [p.name for p in export.versions(root)] == [v4.name, "v000000000005"]
    assert not list(root.glob(".*tmp"))


def test_export_refuses_a_different_feature_spec_and_missing_dirs(tmp_path):
    v = export.export(_trained(1), tmp_path)
    spec = json.loads((v / "features.json").read_text())
    spec["hash_probe"][0] += 1  # as if exported by code that hashes ids differently
    (v / "features.json").write_text(json.dumps(spec))
    with pytest.raises(export.ExportError, match="hash_probe"):
        export.load(tmp_path, device="cpu")
    with pytest.raises(export.ExportError, match="no version directory"):
        export.load(tmp_path / "nothing", device="cpu")


def test_score_cli_with_model_export(tmp_path, capsys):
    learner = _trained()
    export.export(learner, tmp_path / "m")
    exs = make_examples(20, seed=4)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(b"\n".join(schema.encode(e.impression) for e in exs) + b"\n")
    cfg = replace(load_config(env={}), trainer={"device": "cpu"})
    args = argparse.Namespace(model=str(tmp_path / "m"), checkpoint=None, input=str(src), out=str(out))
    assert score.run(args, cfg) == 0
    rows = [msgspec.json.decode(x) for x in out.read_bytes().splitlines()]
    want = learner.score(featurize(exs, learner.tcfg))
    np.testing.assert_allclose([r["p_click"] for r in rows], want[0], rtol=1e-5)
    assert "model version 3" in capsys.readouterr().err
    args.model = str(tmp_path / "absent")
    assert score.run(args, cfg) == 2 and "no version directory" in capsys.readouterr().err


# a tight budget, maintenance every 2 steps: after 6 steps the store holds rows 8, 16 and 32 wide and ids still
# on their table's shared row (admit_hits=1: the shared rows train too)
FIITED = {"backend": "fiited", "embedding_dim": 32,
          "fiited": {"budget": 0.02, "maintain_every": 2, "resize_every": 2, "admit_hits": 1}}


def test_fiited_export_holds_every_slot_padded_and_scores_like_the_learner(tmp_path):
    learner = _trained(6, **FIITED)
    emb = learner.model.emb
    v = export.export(learner, tmp_path)
    st = torch.load(v / "model.pt", weights_only=True)
    w, widths = st["embeddings"], st["embedding_widths"]
    t_, r_, d_ = emb.num_tables, emb.rows, emb.dim
    assert w.shape == (t_, r_, d_) and widths.shape == (t_, r_)
    # the exported table is what the live store looks up: one id per bag, bag (t, b) holds slot b of table t
    with torch.no_grad():
        live = emb(torch.arange(r_).repeat(t_), torch.arange(t_ * r_ + 1))  # (R, T*D)
    assert torch.equal(w, live.view(r_, t_, d_).transpose(0, 1))
    # each slot's width is its row's: admitted rows of every width, the rest the shared row's (dims[0])
    private = emb.code.nonzero()[:, 0].tolist()
    assert [int(widths.view(-1)[s]) for s in private] == [
        emb.chunks(s // r_, s % r_) * emb.cfg.chunk_dim for s in private]
    assert sorted(widths.unique().tolist()) == list(emb.dims) == [8, 16, 32]
    assert (widths.view(-1)[emb.code == 0] == emb.dims[0]).all()
    assert not w[torch.arange(d_) >= widths[..., None]].any()  # missing chunks are zeros
    exs = make_examples(128 * 2, seed=3) + make_examples(50, seed=9)  # ids it trained on, and others
    for backend in ("torch", "fiited"):  # fiited: a config shared with the trainer scores on fixed tables
        m = export.load(tmp_path, device="cpu", backend=backend)
        assert m.meta["backend"] == "fiited" and m.tcfg.backend != "fiited"
        rows = score.score_impressions(m, [e.impression for e in exs])
        _assert_scores_like(learner, exs, [r.p_click for r in rows], [r.p_conversion for r in rows])


@pytest.mark.parametrize("backend", ["auto", "fiited"])
def test_export_and_score_cli_on_a_fiited_checkpoint(tmp_path, monkeypatch, capsys, backend):
    """`streamrec export --checkpoint` on what a fiited trainer wrote, then `streamrec score --model`, under the
    default config (auto) and under the trainer's own (backend fiited)."""
    from deploy.cli import main
    from trainer import checkpoint

    learner = _trained(6, **FIITED)
    cfg = replace(load_config(env={}), trainer=msgspec.to_builtins(learner.tcfg))
    checkpoint.save(tmp_path / "ckpt", {"learner": learner.state(), "config": msgspec.to_builtins(cfg)}, seq=1)
    for k, val in {"STREAMREC_CONFIG": "", "STREAMREC_TRAINER__DEVICE": "cpu",
                   "STREAMREC_TRAINER__BACKEND": backend}.items():
        monkeypatch.setenv(k, val)
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "m")]) == 0
    assert "exported model version 6" in capsys.readouterr().err
    exs = make_examples(128, seed=3) + make_examples(30, seed=4)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_bytes(b"\n".join(schema.encode(e.impression) for e in exs) + b"\n")
    assert main(["score", "--model", str(tmp_path / "m"), str(src), "--out", str(out)]) == 0
    rows = [msgspec.json.decode(x) for x in out.read_bytes().splitlines()]
    _assert_scores_like(learner, exs, [r["p_click"] for r in rows], [r["p_conversion"] for r in rows])


def test_device_auto_picks_cuda_only_when_available(monkeypatch):
    assert embeddings.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert embeddings.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert embeddings.resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ValueError, match="trainer.device"):
        embeddings.resolve_device("tpu")


def test_backend_falls_back_to_torch_without_fbgemm(monkeypatch):
    """The GPU image has CUDA torch but no fbgemm: `auto` must pick the plain-torch path and train."""
    monkeypatch.setattr(embeddings, "fbgemm_available", lambda device_type="cpu": False)
    assert embeddings.resolve_backend("auto", torch.device("cpu")) == "torch"
    assert embeddings.resolve_backend("auto", torch.device("cuda")) == "torch"
    with pytest.raises(ValueError, match="fbgemm_gpu is not usable"):
        embeddings.resolve_backend("fbgemm", torch.device("cpu"))
    learner = _trained(2, backend="auto")
    assert learner.backend == "torch" and isinstance(learner.model.emb, embeddings.TorchEmbeddings)
    assert learner.steps == 2


def test_fbgemm_cuda_needs_the_cuda_wheel():
    # this machine has the CPU-only wheel (fbgemm-gpu-cpu): usable on cpu, never claimed for cuda
    import importlib.metadata

    if not embeddings.fbgemm_available("cpu"):
        pytest.skip("fbgemm_gpu not importable here")
    try:
        importlib.metadata.version("fbgemm-gpu")
        pytest.skip("the CUDA fbgemm wheel is installed here")
    except importlib.metadata.PackageNotFoundError:
        pass
    assert embeddings.fbgemm_available("cuda") is False
    assert embeddings.resolve_backend("auto", torch.device("cuda")) == "torch"
