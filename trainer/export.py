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

A version directory is written under a temporary name (every file fsynced) and renamed into place, so a
reader never sees a partial one (:func:`write_dir_atomically`, shared with trainer/publish.py, whose
continuous versions reuse this module's feature spec check and serving layout). :func:`load` checks the feature spec against this code (table order, domains and the hash of
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

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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


def dense_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the model's parameters and buffers except the sparse embeddings (``emb.*``) and the
    training-only heads, the auxiliary distillation head (``aux.*``) and C2AL's cohort heads (``c2al.*``,
    trainer/model.py): what serving loads."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
            if not k.startswith(("emb.", "aux.", "c2al."))}


def tensor_bytes(obj) -> bytes:
    """``torch.save`` of ``obj`` (tensors, dicts, lists, numbers) as bytes; read back with :func:`tensor_load`."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def tensor_load(data: bytes):
    """The inverse of :func:`tensor_bytes`, with torch's ``weights_only`` unpickler (no code runs)."""
    import io

    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def config_bytes(tcfg: TrainerConfig) -> bytes:
    return json.dumps(msgspec.to_builtins(tcfg), indent=1).encode()


def features_bytes(tcfg: TrainerConfig) -> bytes:
    return json.dumps(feature_spec(tcfg), indent=1).encode()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_dir_atomically(root: str | os.PathLike, name: str, files: dict[str, bytes], *,
                         last: Callable[[dict[str, dict]], tuple[str, bytes]] | None = None,
                         replace: bool = False) -> tuple[Path, dict[str, dict]]:
    """Write ``files`` ({file name: content}) as the directory ``root/name``, all or nothing.

    The files go into ``root/.<name>.<pid>.tmp`` (each fsynced); then ``last(checksums)`` may add one more file
    written after all others (a manifest naming them: ``checksums`` = {file name: {"sha256", "bytes"}}); the
    directory is fsynced, renamed to ``root/name`` and the rename fsynced. A crash leaves at most a temporary
    directory (a dot name readers skip). ``replace``: an existing ``root/name`` is replaced (else
    ``FileExistsError``). Returns ``(root/name, checksums)`` (``last``'s file not among them).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    if final.exists() and not replace:
        raise FileExistsError(f"{final} exists")
    tmp = root / f".{name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    sums: dict[str, dict] = {}

    def put(fname: str, data: bytes) -> None:
        with open(tmp / fname, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    try:
        for fname, data in files.items():
            put(fname, data)
            sums[fname] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        if last is not None:
            put(*last(sums))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final, sums


def export(learner, root: str | os.PathLike, *, examples_trained: int = 0, keep: int = 5) -> Path:
    """Write ``learner``'s model as version ``steps`` under ``root``; returns the version directory.

    Re-exporting the same version replaces it. Only the newest ``keep`` versions are kept.
    """
    root = Path(root)
    view = getattr(learner, "user_view", None)  # the user vectors the ranker reads (trainer.users.model)
    sparse = learner.model.emb.serving_state()
    model_pt = tensor_bytes({"dense": dense_state(learner.model), "embeddings": sparse["weights"],
                             "embedding_widths": sparse["widths"],
                             **({"user_view": view.state()} if view is not None else {}),
                             # the ads' semantic IDs (trainer.ad_id_features): codes and codebook, no contents
                             **({"semantic_ids": learner.semantic_ids.state(with_content=False)}
                                if getattr(learner, "semantic_ids", None) is not None else {})})
    version = json.dumps({
        "format": EXPORT_FORMAT, "model_version": learner.steps, "exported_ts": int(time.time() * 1000),
        "examples_trained": examples_trained, "backend": learner.backend, "torch": torch.__version__}, indent=1)
    name = version_name(learner.steps)
    final, _ = write_dir_atomically(root, name, {
        "model.pt": model_pt, "config.json": config_bytes(learner.tcfg), "features.json": features_bytes(learner.tcfg),
        "version.json": version.encode()}, replace=True)
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
    semantic_ids: object = None  # embedding_store.semantic_ids.SemanticIds when ad_id_features reads them


def load(path: str | os.PathLike, device: str = "auto", backend: str = "auto") -> ExportedModel:
    """Load an export (root or version directory) for scoring on ``device`` with ``backend``.

    ``backend=fiited`` (a config shared with a FIITED trainer) scores with the fixed-width backend ``auto``
    picks: the export holds fixed-width tables, which only those read, and scoring never trains a store.
    """

    v = resolve(path)
    try:
        meta = json.loads((v / "version.json").read_text())
        cfg = json.loads((v / "config.json").read_text())
        spec = json.loads((v / "features.json").read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"model export {v}: unreadable metadata: {e}") from e
    if meta.get("format") != EXPORT_FORMAT:
        raise ExportError(f"model export {v}: expected format {EXPORT_FORMAT}, got {meta.get('format')!r}")
    model, tcfg, dev = serving_model(cfg, spec, device, backend, f"model export {v}", ExportError)
    try:
        st = torch.load(v / "model.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise ExportError(f"model export {v}: cannot load model.pt: {e}") from e
    load_dense(model, st["dense"], f"model export {v}: model.pt", ExportError)
    load_serving_weights(model, st["embeddings"])
    view = None
    if "user_view" in st:
        from trainer.users.features import UserVectors

        view = UserVectors.from_state(st["user_view"])
    sids = None
    if "semantic_ids" in st:
        from embedding_store.semantic_ids import SemanticIds

        sids = SemanticIds.from_state(st["semantic_ids"])
    elif tcfg.ad_id_features != "hash" and not tcfg.sid_path:  # sid_path: codes in the impressions
        raise ExportError(f"model export {v}: the model reads semantic IDs ({tcfg.ad_id_features}) but model.pt "
                          "has none")
    return ExportedModel(model=model, tcfg=tcfg, device=dev, steps=int(meta["model_version"]), meta=meta, path=v,
                         user_view=view, semantic_ids=sids)


def serving_model(cfg: dict, spec: dict, device: str, backend: str, where: str, error: type[Exception] = ExportError
                  ) -> tuple[torch.nn.Module, TrainerConfig, torch.device]:
    """A fresh scoring model (eval mode) for the TrainerConfig ``cfg`` (as config.json holds it), after checking
    the saved feature spec ``spec`` against this code; ``(model, tcfg, device)``. ``backend=fiited`` (a config
    shared with a FIITED trainer) scores with the fixed-width backend ``auto`` picks. Raises ``error``."""
    from trainer.embeddings import resolve_backend, resolve_device
    from trainer.model import MDMOModel

    backend = "auto" if backend == "fiited" else backend
    try:
        tcfg = msgspec.convert({**cfg, "device": device, "backend": backend}, TrainerConfig)
    except msgspec.ValidationError as e:
        raise error(f"{where}: config.json is not a trainer config of this code: {e}") from e
    if tcfg.loopfm:  # its input holds the FM's vectors (trainer/loopfm.py), which serving does not read
        raise error(f"{where}: the model was trained with trainer.loopfm (the FM's user/ad vectors as input); "
                    "serving and offline scoring do not read the FM embedding store: serve a model trained "
                    "with trainer.loopfm off")
    if tcfg.solaris:  # its input holds the FM's cached pair predictions (trainer/solaris.py): serving has no cache
        raise error(f"{where}: the model was trained with trainer.solaris (the FM's cached pair predictions as "
                    "input); serving and offline scoring do not read the SOLARIS pair cache: serve a model trained "
                    "with trainer.solaris off")
    here = feature_spec(tcfg)
    diff = sorted(k for k in here if spec.get(k) != here[k])
    if diff:
        raise error(f"{where}: feature spec differs from this code in {diff} "
                    f"(exported {[spec.get(k) for k in diff]}, here {[here[k] for k in diff]})")
    dev = resolve_device(device)
    model = MDMOModel(tcfg, resolve_backend(backend, dev), dev)
    model.eval()
    return model, tcfg, dev


def load_dense(model: torch.nn.Module, dense: dict, where: str, error: type[Exception] = ExportError) -> None:
    """Load the non-embedding state ``dense`` into ``model``; every such key must match (raises ``error``)."""
    try:
        missing, unexpected = model.load_state_dict(dense, strict=False)
    except Exception as e:
        raise error(f"{where}: cannot load the dense parameters: {e}") from e
    missing = [k for k in missing if not k.startswith("emb.")]
    if missing or unexpected:
        raise error(f"{where} does not match the model: missing {missing}, unexpected {unexpected}")


def load_serving_weights(model: torch.nn.Module, weights: torch.Tensor) -> None:
    """Put a serving layout's ``weights`` (T, R, D) into a fixed-width scoring model (optimizer state zero)."""
    model.emb.import_state({"weights": weights, "momentum": torch.zeros(weights.shape[:2])})
