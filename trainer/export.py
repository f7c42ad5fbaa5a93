"""Model export for serving: a versioned, self-describing artifact directory (no optimizer state).

Layout (``ROOT`` = the export root; one sub-directory per model version, the newest named in ``LATEST``)::

    ROOT/LATEST                      "v000000001234" (written last, atomically)
    ROOT/v000000001234/model.pt      {"dense": state_dict without embeddings, "embeddings": (T, R, D) float32,
                                      "embedding_widths": (T, R) int16}
                      config.json    the TrainerConfig the model was built with
                      features.json  feature spec: tables, hash buckets, slots, domains, golden hashes
                      version.json   {format, model_version (training steps), exported_ts, examples_trained,
                                      backend, torch}

Every backend exports the same embedding layout (``SparseEmbeddings.serving_state``): the vector each hashed
slot looks up, zero-padded to D, and the width of the row behind it; a FIITED store's variable-width rows
(and the shared rows of ids it has not admitted) are written that way, so any fixed-width backend scores
with them.

A version directory is written under a temporary name and renamed into place, so a reader never sees a
partial one. :func:`load` checks the feature spec against this code (table order, domains and the hash of
probe ids): a model whose features would be computed differently is refused instead of silently scoring
garbage.

>>> import tempfile
>>> from config import TrainerConfig
>>> from trainer.model import Learner
>>> root = tempfile.mkdtemp()
>>> path = export(Learner(TrainerConfig(hash_buckets=100, device="cpu")), root)
>>> path.name, sorted(p.name for p in path.iterdir())
('v000000000000', ['config.json', 'features.json', 'model.pt', 'version.json'])
>>> m = load(root, device="cpu")
>>> m.steps, m.tcfg.hash_buckets
(0, 100)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
import torch

from streams import schema
from config import TrainerConfig

EXPORT_FORMAT = 1
LATEST = "LATEST"
_PROBE_IDS = np.array([0, 1, 12345, 2**63 - 1], dtype=np.uint64)


class ExportError(RuntimeError):
    """No usable export, or one this code cannot score with."""


def feature_spec(tcfg: TrainerConfig) -> dict:
    """What the features of ``tcfg`` look like in this code (compared on load)."""
    from trainer.features import DENSE_LINEAR_RANGE, hash_ids, table_names

    tables = np.arange(len(_PROBE_IDS)) % len(table_names(tcfg))
    return {"tables": table_names(tcfg), "hash_buckets": tcfg.hash_buckets, "embedding_dim": tcfg.embedding_dim,
            "cat_slots": tcfg.cat_slots, "dense_dim": tcfg.dense_dim, "history_len": tcfg.history_len,
            "user_features": 2 * tcfg.user_dim if tcfg.user_model else 0,
            "dense_transform": f"soft_log({DENSE_LINEAR_RANGE})", "domains": list(schema.DOMAINS),
            "hash": "splitmix64(id ^ golden*(table+1)) % buckets",
            "hash_probe": hash_ids(_PROBE_IDS, tables, tcfg.hash_buckets).tolist()}


def version_name(steps: int) -> str:
    return f"v{steps:012d}"


def export(learner, root: str | os.PathLike, *, examples_trained: int = 0, keep: int = 5) -> Path:
    """Write ``learner``'s model as version ``steps`` under ``root``; returns the version directory.

    Re-exporting the same version replaces it. Only the newest ``keep`` versions are kept.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = version_name(learner.steps)
    tmp = root / f".{name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        dense = {k: v.detach().cpu().clone() for k, v in learner.model.state_dict().items()
                 if not k.startswith("emb.")}
        view = getattr(learner, "user_view", None)  # the user vectors the ranker reads (trainer.users.model)
        sparse = learner.model.emb.serving_state()
        torch.save({"dense": dense, "embeddings": sparse["weights"], "embedding_widths": sparse["widths"],
                    **({"user_view": view.state()} if view is not None else {})}, tmp / "model.pt")
        (tmp / "config.json").write_text(json.dumps(msgspec.to_builtins(learner.tcfg), indent=1))
        (tmp / "features.json").write_text(json.dumps(feature_spec(learner.tcfg), indent=1))
        (tmp / "version.json").write_text(json.dumps({
            "format": EXPORT_FORMAT, "model_version": learner.steps, "exported_ts": int(time.time() * 1000),
            "examples_trained": examples_trained, "backend": learner.backend, "torch": torch.__version__}, indent=1))
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    latest_tmp = root / f".{LATEST}.{os.getpid()}.tmp"
    latest_tmp.write_text(name + "\n")
    os.replace(latest_tmp, root / LATEST)
    for old in versions(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def versions(root: str | os.PathLike) -> list[Path]:
    """Version directories under ``root``, oldest first."""
    r = Path(root)
    if not r.is_dir():
        return []
    return sorted(p for p in r.iterdir() if p.is_dir() and p.name.startswith("v") and p.name[1:].isdigit())


def resolve(path: str | os.PathLike) -> Path:
    """A version directory: ``path`` itself, or the one ``path/LATEST`` names (else the newest)."""
    p = Path(path)
    if (p / "version.json").is_file():
        return p
    latest = p / LATEST
    if latest.is_file():
        v = p / latest.read_text().strip()
        if (v / "version.json").is_file():
            return v
    found = versions(p)
    if not found:
        raise ExportError(f"model export {p}: no version directory (expected {p}/vNNN/version.json)")
    return found[-1]


@dataclass
class ExportedModel:
    """A loaded export: what :func:`trainer.score.score_impressions` needs (``model``, ``tcfg``, ``device``),
    plus ``steps`` (the model version) and the ``meta`` of ``version.json``."""

    model: torch.nn.Module
    tcfg: TrainerConfig
    device: torch.device
    steps: int
    meta: dict
    path: Path
    user_view: object = None  # trainer.users.features.UserVectors when the model reads user-model features


def load(path: str | os.PathLike, device: str = "auto", backend: str = "auto") -> ExportedModel:
    """Load an export (root or version directory) for scoring on ``device`` with ``backend``.

    ``backend=fiited`` (a config shared with a FIITED trainer) scores with the fixed-width backend ``auto``
    picks: the export holds fixed-width tables, which only those read, and scoring never trains a store.
    """
    from trainer.embeddings import resolve_backend, resolve_device
    from trainer.model import MDMOModel

    v = resolve(path)
    try:
        meta = json.loads((v / "version.json").read_text())
        cfg = json.loads((v / "config.json").read_text())
        spec = json.loads((v / "features.json").read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"model export {v}: unreadable metadata: {e}") from e
    if meta.get("format") != EXPORT_FORMAT:
        raise ExportError(f"model export {v}: expected format {EXPORT_FORMAT}, got {meta.get('format')!r}")
    backend = "auto" if backend == "fiited" else backend
    tcfg = msgspec.convert({**cfg, "device": device, "backend": backend}, TrainerConfig)
    here = feature_spec(tcfg)
    diff = sorted(k for k in here if spec.get(k) != here[k])
    if diff:
        raise ExportError(f"model export {v}: feature spec differs from this code in {diff} "
                          f"(exported {[spec.get(k) for k in diff]}, here {[here[k] for k in diff]})")
    dev = resolve_device(device)
    model = MDMOModel(tcfg, resolve_backend(backend, dev), dev)
    try:
        st = torch.load(v / "model.pt", map_location="cpu", weights_only=True)
        missing, unexpected = model.load_state_dict(st["dense"], strict=False)
    except Exception as e:
        raise ExportError(f"model export {v}: cannot load model.pt: {e}") from e
    missing = [k for k in missing if not k.startswith("emb.")]
    if missing or unexpected:
        raise ExportError(f"model export {v}: model.pt does not match the model: missing {missing}, "
                          f"unexpected {unexpected}")
    w = st["embeddings"]
    model.emb.import_state({"weights": w, "momentum": torch.zeros(w.shape[:2])})
    model.eval()
    view = None
    if "user_view" in st:
        from trainer.users.features import UserVectors

        view = UserVectors.from_state(st["user_view"])
    return ExportedModel(model=model, tcfg=tcfg, device=dev, steps=int(meta["model_version"]), meta=meta, path=v,
                         user_view=view)
