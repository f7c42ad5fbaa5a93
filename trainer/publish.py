"""Continuous model publishing: the trainer writes a new model version every few seconds, the ranking service
reads the newest one and swaps it in. The writer is :class:`Publisher`; the reader :class:`VersionStore`.

On-disk format
--------------
One publish root per arm (``<models_dir>/<arm>``, ``trainer.publish_dir``), one directory per version::

    ROOT/v000000000001/   full    manifest.json, dense.pt, embeddings.pt, users.pt, config.json, features.json
    ROOT/v000000000002/   delta   manifest.json, dense.pt, rows.pt, users.pt
    ...
    ROOT/v000000000021/   full    (every ``publish_full_every`` versions, and the first of a trainer process)
    ROOT/PINNED           optional: a seq; readers serve that version (``streamrec models rollback``)

``manifest.json`` (``sha256``: of its canonical JSON without that field): ``format`` (1), ``seq`` (1, 2, 3, ... per root), ``kind`` (full | delta), ``base`` (the
seq of the full snapshot the version builds on; a full's own seq), ``prev`` (the seq a delta applies to;
null for a full), ``steps`` (the learner's steps), ``examples_trained``, ``trained_ts`` (wall ms of the
newest training step included), ``created_ts`` (wall ms written), ``arm``, ``backend`` (the trainer's),
``embedding`` ({tables, rows, dim}), ``counts`` (what a delta holds) and ``files``: {name: {sha256, bytes}}
of every other file. The ``.pt`` files are ``torch.save`` dicts of tensors (read with ``weights_only``):

* ``dense.pt``: every parameter and buffer except the sparse embeddings (a state_dict without ``emb.*``);
  full and delta alike (~1 MB at the default sizes: dense weights change at every step).
* ``embeddings.pt`` (full): the serving layout every backend exports (``SparseEmbeddings.serving_state``):
  ``weights`` (T, R, D) float32, the vector each hashed slot looks up zero-padded to D, ``widths`` (T, R)
  int16, and for a FIITED store ``shared`` (T, R) bool: the slots that read their table's shared row.
* ``rows.pt`` (delta): the slots whose vector may have changed since ``prev``: ``table``, ``row`` (K,)
  int32, ``vectors`` (K, D) float32, ``widths`` (K,) int16 (``shared`` (K,) bool for FIITED), and
  ``fill_tables`` (S,), ``fill_vectors`` (S, D), ``fill_widths`` (S,): tables whose shared row changed;
  every slot reading it takes the new vector (one row per table instead of every not-admitted id).
* ``users.pt`` (when the ranker reads user-model vectors): full: ``ids`` (N,), ``vectors`` (N, d),
  ``ad_table`` (A, d); delta: the users whose vector changed (``ids``, ``vectors``), ``deleted`` ids, and
  the changed ad rows (``ad_rows``, ``ad_vectors``).
* ``early_stage.pt`` (when the trainer trains the early-stage ranker, ``trainer.early_stage``): its dense
  weights, and its embedding rows: all of them in a full (or when its changes are unknown), the rows it trained
  since the previous version in a delta (:func:`trainer.early_stage.serving_state`); ``Published.early_stage``.
* ``semantic_ids.pt`` (when ``trainer.ad_id_features`` reads semantic IDs; in a full, and in a delta when the
  codebook or the coded ads changed since the previous version): the ads' codes and the codebook
  (:meth:`embedding_store.semantic_ids.SemanticIds.state` without the contents); a version without it keeps the
  previous one's. Serving codes a request's ads with it; an ad born after the version was written scores by its
  hashed raw id until the next version.
* ``config.json`` / ``features.json`` (full): the TrainerConfig and the feature spec
  (:func:`trainer.export.feature_spec`), checked against this code on load: a model whose features this code
  would compute differently is refused.

What a delta holds: the fixed-width backends (fbgemm, torch) mark the slots of every training lookup in a
bitmap (``SparseEmbeddings.track_changes``), exactly the rows row-wise Adagrad may update; a FIITED store
reports its own changes (trained rows, admissions, evictions, resizes, trained shared rows), since a slot's
serving vector there also changes without the slot being trained. The user view (refreshed by the user
model's thread) is diffed against the copy published last. Rebuilding a version from its full snapshot
and the deltas after it gives the same tensors, bit for bit, as a full snapshot taken at that version
(tests/test_publish.py checks it for every backend).

Guarantees
----------
* Atomic: a version is written into ``ROOT/.vNNN.<pid>.tmp`` (each file fsynced, the manifest last), the
  directory fsynced, renamed to ``ROOT/vNNN`` and the rename fsynced. Readers skip dot names, so they never
  see a partial version; a writer killed mid-way leaves a temporary directory the next writer removes.
* Checked: every file is read once, hashed (sha256) and compared with the manifest before it is used; a
  version with a missing, truncated or altered file, or no/invalid manifest, is refused with the reason
  (:meth:`VersionStore.list`), and the newest version that loads is served instead. A delta needs its
  whole chain back to its full snapshot: a bad delta breaks the versions after it until the next full.
* Retention: after writing a full snapshot the writer keeps the newest ``publish_keep_full`` full chains
  (and the pinned version's chain); older versions are renamed away, then deleted.
* One writer per root (the arm's trainer); any number of readers.

The reader: ``VersionStore(root).load()`` -> :class:`Published` (the pin, else the newest valid version);
``advance(current)`` -> the version to serve now, built from ``current`` on a copy when only deltas are
newer (``current`` is never mutated: a service keeps scoring with it during the swap), or None to keep it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from config import TrainerConfig
from streams.names import Stat
from trainer.export import (
    config_bytes,
    dense_state,
    features_bytes,
    load_dense,
    load_serving_weights,
    serving_model,
    tensor_bytes,
    tensor_load,
    write_dir_atomically,
)

log = logging.getLogger("streamrec.publish")

FORMAT = 1
MANIFEST = "manifest.json"
PINNED = "PINNED"
_NAME = re.compile(r"^v(\d{12})$")
FULL, DELTA = "full", "delta"


def seq_name(seq: int) -> str:
    return f"v{seq:012d}"


class VersionError(RuntimeError):
    """No usable version, or a corrupt or partial one (the message says why)."""


@dataclass(frozen=True)
class VersionInfo:
    """One version directory as :meth:`VersionStore.list` sees it."""

    seq: int
    kind: str  # full | delta | "?" (no readable manifest)
    base: int
    prev: int | None
    steps: int
    examples_trained: int
    trained_ts: int
    created_ts: int
    bytes: int
    ok: bool
    reason: str  # why not ok ("" when ok)
    pinned: bool
    path: str


@dataclass(frozen=True)
class Published:
    """One loaded model version, ready to score; never mutated (``advance`` builds new ones)."""

    model: torch.nn.Module  # trainer.model.MDMOModel in eval mode, fixed-width embeddings
    tcfg: TrainerConfig
    device: torch.device
    seq: int
    steps: int
    examples_trained: int
    trained_ts: int
    created_ts: int
    arm: str
    user_view: object | None  # trainer.users.features.UserVectors when tcfg.user_model
    meta: dict  # the manifest
    # the serving layout's widths (T * R,) int16 and, for a FIITED trainer, which slots read their table's
    # shared row (T * R,) bool: what the next delta needs besides the model (see the module docstring)
    embedding_widths: torch.Tensor | None = None
    shared_slots: np.ndarray | None = None
    # the early-stage ranker published with the version (trainer/early_stage.py EarlyStageModel, eval mode), for
    # the serving cascade; None when the trainer has none (trainer.early_stage off)
    early_stage: object | None = None
    semantic_ids: object | None = None  # embedding_store.semantic_ids.SemanticIds when ad_id_features reads them


# ---- the writer ---------------------------------------------------------------------------------------
def _version_seqs(root: Path) -> list[int]:
    """Seqs of the version directories under ``root`` (manifest or not), ascending."""
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir():
            out.append(int(m.group(1)))
    return sorted(out)


def _user_snapshot(view) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids sorted (N,), vectors (N, d), ad table (A, d)): copies of the user view's state."""
    st = view.vectors()
    ids, vecs = st["ids"].numpy(), st["vectors"].numpy()
    order = np.argsort(ids, kind="stable")
    return ids[order].copy(), vecs[order].copy(), view.ad_table.detach().cpu().numpy().copy()


def _bits(a: np.ndarray) -> np.ndarray:
    """float32 as int32 bits: compare exactly (-0.0 vs 0.0, NaN payloads)."""
    return np.ascontiguousarray(a, dtype=np.float32).view(np.int32)


def user_delta(prev, cur) -> dict[str, torch.Tensor]:
    """The ``users.pt`` of a delta from snapshot ``prev`` to ``cur`` (see :func:`_user_snapshot`)."""
    ids_p, v_p, ad_p = prev
    ids_c, v_c, ad_c = cur
    pos = np.minimum(np.searchsorted(ids_p, ids_c), max(len(ids_p) - 1, 0))
    found = (pos < len(ids_p)) & (ids_p[pos] == ids_c) if len(ids_p) else np.zeros(len(ids_c), bool)
    changed = ~found
    if found.any():
        changed[found] = (_bits(v_p[pos[found]]) != _bits(v_c[found])).any(axis=1)
    deleted = ids_p[~np.isin(ids_p, ids_c)]
    if ad_p.shape == ad_c.shape:
        ad_rows = np.flatnonzero((_bits(ad_p) != _bits(ad_c)).any(axis=1))
    else:
        ad_rows = np.arange(len(ad_c))
    return {"ids": torch.from_numpy(ids_c[changed].copy()), "vectors": torch.from_numpy(v_c[changed].copy()),
            "deleted": torch.from_numpy(deleted.copy()), "ad_rows": torch.from_numpy(ad_rows.astype(np.int64)),
            "ad_vectors": torch.from_numpy(ad_c[ad_rows].copy()), "ad_shape": torch.tensor(ad_c.shape)}


class Publisher:
    """Writes the versions of one publish root (see the module docstring); one per root at a time.

    ``publish(learner, ...)`` writes the next version: a full snapshot when it is the first of this
    publisher, every ``full_every`` versions, or when the embeddings cannot say what changed (a state was
    imported); else a delta since the previous version. After a full, only the newest ``keep_full`` chains
    are kept. ``stats()``: the last publish's figures for the trainer's ServiceStats.
    """

    def __init__(self, root: str | os.PathLike, *, full_every: int = 20, keep_full: int = 3, arm: str = "main"):
        if full_every < 1 or keep_full < 1:
            raise ValueError(f"publish_full_every and publish_keep_full must be >= 1, got {full_every}, {keep_full}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.full_every, self.keep_full, self.arm = full_every, keep_full, arm
        for p in self.root.iterdir():  # what a killed writer left (one writer per root)
            if p.name.startswith(".v") and p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True)
        seqs = _version_seqs(self.root)
        self.seq = seqs[-1] if seqs else 0  # the newest version on disk (ours or an earlier writer's)
        self._base: int | None = None  # the full our change tracking builds on (None: next one is a full)
        self._users = None  # the user snapshot published last
        self._sids_key: tuple | None = None  # (codebook version, ads coded) of the semantic ids published last
        self._full_bytes = 0
        self.last: dict[str, float] = {}

    @classmethod
    def for_trainer(cls, root: str | os.PathLike, tcfg: TrainerConfig) -> "Publisher":
        return cls(root, full_every=tcfg.publish_full_every, keep_full=tcfg.publish_keep_full, arm=tcfg.arm)

    def publish(self, learner, *, examples_trained: int = 0, trained_ts: int | None = None,
                full: bool = False) -> VersionInfo:
        """Write ``learner``'s model as the next version (``full``: force a full snapshot); returns it."""
        t0 = time.perf_counter()
        emb = learner.model.emb
        seq = max(self.seq, *(_version_seqs(self.root)[-1:] or [0])) + 1
        changes = emb.take_changes() if self._base is not None else None
        view = getattr(learner, "user_view", None)
        users = _user_snapshot(view) if view is not None else None
        kind = FULL if (full or changes is None or seq - self._base >= self.full_every
                        or (users is None) != (self._users is None)) else DELTA  # user vectors came or went
        if kind == FULL:
            emb.track_changes()  # from this state on (same thread: no step in between)
            sparse = emb.serving_state()
            emb_st = {"weights": sparse["weights"], "widths": sparse["widths"]}
            shared = emb.serving_shared()
            if shared is not None:
                emb_st["shared"] = torch.from_numpy(shared.reshape(emb.num_tables, emb.rows).copy())
            files = {"dense.pt": tensor_bytes(dense_state(learner.model)), "embeddings.pt": tensor_bytes(emb_st)}
            if users is not None:
                ids, vecs, ad = users
                files["users.pt"] = tensor_bytes({"ids": torch.from_numpy(ids), "vectors": torch.from_numpy(vecs),
                                                  "ad_table": torch.from_numpy(ad)})
            _semantic_ids_file(learner, files, None)
            files["config.json"] = config_bytes(learner.tcfg)
            files["features.json"] = features_bytes(learner.tcfg)
            counts = {"rows": emb.num_tables * emb.rows}
            base, prev = seq, None
        else:
            slots = changes.slots
            vecs, widths = emb.serving_rows(slots)
            rows = {"table": torch.from_numpy((slots // emb.rows).astype(np.int32)),
                    "row": torch.from_numpy((slots % emb.rows).astype(np.int32)), "vectors": vecs, "widths": widths}
            shared = emb.serving_shared()
            if shared is not None:
                rows["shared"] = torch.from_numpy(shared[slots].copy())
            fv, fw = (emb.shared_rows(changes.shared_tables) if len(changes.shared_tables)
                      else (torch.zeros(0, emb.dim), torch.zeros(0, dtype=torch.int16)))
            rows.update({"fill_tables": torch.from_numpy(changes.shared_tables), "fill_vectors": fv, "fill_widths": fw})
            files = {"dense.pt": tensor_bytes(dense_state(learner.model)), "rows.pt": tensor_bytes(rows)}
            counts = {"rows": len(slots), "fill_tables": len(changes.shared_tables)}
            if users is not None:
                ud = user_delta(self._users, users)
                files["users.pt"] = tensor_bytes(ud)
                counts.update(users=len(ud["ids"]), users_deleted=len(ud["deleted"]), ad_rows=len(ud["ad_rows"]))
            _semantic_ids_file(learner, files, self._sids_key)
            base, prev = self._base, self.seq
        early = getattr(learner, "early_stage", None)  # trainer.early_stage: its weights ride along
        if early is not None:
            from trainer.early_stage import serving_state

            files["early_stage.pt"] = tensor_bytes(serving_state(early, full=kind == FULL))
        now = int(time.time() * 1000)
        manifest = {"format": FORMAT, "seq": seq, "kind": kind, "base": base, "prev": prev,
                    "steps": int(learner.steps), "examples_trained": int(examples_trained),
                    "trained_ts": int(trained_ts if trained_ts is not None else now), "created_ts": now,
                    "arm": self.arm, "backend": learner.backend,
                    "embedding": {"tables": emb.num_tables, "rows": emb.rows, "dim": emb.dim}, "counts": counts,
                    "torch": torch.__version__}

        def last(sums: dict) -> tuple[str, bytes]:
            manifest["files"] = sums
            manifest["sha256"] = _manifest_sha256(manifest)
            return MANIFEST, json.dumps(manifest, indent=1).encode()

        try:
            path, sums = write_dir_atomically(self.root, seq_name(seq), files, last=last)
        except BaseException:
            self._base = None  # the changes taken are lost with this version: the next one is a full
            raise
        size = sum(s["bytes"] for s in sums.values())
        self.seq = seq
        self._users = users
        self._sids_key = _sids_key(learner)
        if kind == FULL:
            self._base, self._full_bytes = seq, size
            self._retain()
        self.last = {Stat.PUBLISHED_SEQ: float(seq), Stat.PUBLISH_BYTES: float(size),
                     Stat.PUBLISH_S: time.perf_counter() - t0, "publish_full": float(kind == FULL),
                     Stat.DELTA_FRACTION: size / max(self._full_bytes, 1)}
        log.debug("published %s (%s, %d bytes) in %.3fs", path, kind, size, self.last[Stat.PUBLISH_S])
        return VersionInfo(seq=seq, kind=kind, base=base, prev=prev, steps=manifest["steps"],
                           examples_trained=manifest["examples_trained"], trained_ts=manifest["trained_ts"],
                           created_ts=now, bytes=size, ok=True, reason="", pinned=False, path=str(path))

    def stats(self) -> dict[str, float]:
        """The newest version's gauges (``Stat.PUBLISHED_SEQ``, ``PUBLISH_BYTES``, ``PUBLISH_S``,
        ``DELTA_FRACTION``, ``publish_full``) for the trainer's ServiceStats; empty before the first."""
        return {str(k): v for k, v in self.last.items()}

    def _retain(self) -> None:
        """Keep the newest ``keep_full`` full chains and the pinned version's chain; delete the rest."""
        kinds = {s: _read_json(self.root / seq_name(s) / MANIFEST) for s in _version_seqs(self.root)}
        fulls = [s for s, m in kinds.items() if m and m.get("kind") == FULL]
        if len(fulls) <= self.keep_full:
            return
        cutoff = fulls[-self.keep_full]
        keep: set[int] = set()
        pin = read_pin(self.root)
        if pin is not None and kinds.get(pin):
            keep = set(range(int(kinds[pin].get("base", pin)), pin + 1))
        # newest first: a delta leaves before the versions it builds on, so a writer killed in the middle leaves
        # complete chains only (oldest first left deltas whose full was gone: visible, and "chain broken")
        for s in sorted(kinds, reverse=True):
            if s < cutoff and s not in keep:
                d = self.root / seq_name(s)
                gone = self.root / f".{seq_name(s)}.{os.getpid()}.del.tmp"
                try:
                    os.rename(d, gone)  # readers stop seeing it at once
                except OSError:
                    continue
                shutil.rmtree(gone, ignore_errors=True)


def _sids_key(learner) -> tuple | None:
    s = getattr(learner, "semantic_ids", None)
    return None if s is None else (s.version, len(s), int(s.stats.get("coded_at_birth", 0)))


def _semantic_ids_file(learner, files: dict, published: tuple | None) -> None:
    """Add ``semantic_ids.pt`` to a version's ``files`` when the learner has semantic IDs that differ from the
    ones ``published`` last (None: always, as in a full snapshot)."""
    key = _sids_key(learner)
    if key is not None and (published is None or key != published):
        files["semantic_ids.pt"] = tensor_bytes(learner.semantic_ids.state(with_content=False))


def _read_json(path: Path) -> dict | None:
    try:
        v = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return v if isinstance(v, dict) else None


def read_pin(root: str | os.PathLike) -> int | None:
    """The pinned seq of ``root`` (``PINNED``), or None."""
    try:
        text = (Path(root) / PINNED).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def write_pin(root: str | os.PathLike, seq: int | None) -> None:
    """Pin ``seq`` (atomically), or remove the pin (None)."""
    root = Path(root)
    if seq is None:
        (root / PINNED).unlink(missing_ok=True)
        return
    tmp = root / f".{PINNED}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{int(seq)}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / PINNED)


# ---- the reader ---------------------------------------------------------------------------------------
class _Building:
    """A model version being built: a full snapshot's state, then deltas applied in place."""

    early_stage = None  # the early-stage ranker (trainer/early_stage.py), when the version has one

    def __init__(self, model, tcfg, device, widths, shared, user_view, semantic_ids=None):
        self.model, self.tcfg, self.device = model, tcfg, device
        self.widths, self.shared, self.user_view = widths, shared, user_view
        self.semantic_ids = semantic_ids  # read-only once loaded: versions may share it

    def published(self, manifest: dict) -> Published:
        m = manifest
        p = Published(model=self.model, tcfg=self.tcfg, device=self.device, seq=int(m["seq"]), steps=int(m["steps"]),
                      examples_trained=int(m["examples_trained"]), trained_ts=int(m["trained_ts"]),
                      created_ts=int(m["created_ts"]), arm=str(m.get("arm", "")), user_view=self.user_view,
                      meta=m, embedding_widths=self.widths, shared_slots=self.shared, early_stage=self.early_stage,
                      semantic_ids=self.semantic_ids)
        self.model = None  # handed over: nothing here touches it again
        return p


class VersionStore:
    """Reads the versions under ``root`` for scoring on ``device`` (see the module docstring)."""

    def __init__(self, root: str | os.PathLike, device: str = "cpu"):
        self.root = Path(root)
        self.device = device
        self._manifests: dict[int, tuple[tuple, dict | str]] = {}  # seq -> (identity, manifest or reason)
        self._refused: dict[int, tuple[tuple, str]] = {}  # seq -> (identity, reason): failed on use
        self._verified: dict[Path, tuple] = {}  # file -> stat identity whose sha256 matched

    # -- manifests -------------------------------------------------------------------------------------
    def _identity(self, seq: int) -> tuple:
        try:
            st = (self.root / seq_name(seq) / MANIFEST).stat()
        except OSError:
            return ()
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _manifest(self, seq: int) -> dict | str:
        """The checked manifest of ``seq``, or why there is none usable (cached per manifest file)."""
        ident = self._identity(seq)
        hit = self._manifests.get(seq)
        if hit is not None and hit[0] == ident and ident:
            return hit[1]
        d = self.root / seq_name(seq)
        if not ident:
            out: dict | str = f"{d.name}: no {MANIFEST} (partial or damaged version)"
        else:
            m = _read_json(d / MANIFEST)
            out = _check_manifest(m, seq, d)
        self._manifests[seq] = (ident, out)
        return out

    def _scan(self) -> dict[int, dict | str]:
        seqs = _version_seqs(self.root)
        alive = set(seqs)
        for cache in (self._manifests, self._refused):  # versions deleted by retention
            for s in [s for s in cache if s not in alive]:
                del cache[s]
        for f in [f for f in self._verified if not f.parent.is_dir()]:
            del self._verified[f]
        return {s: self._manifest(s) for s in seqs}

    def pinned(self) -> int | None:
        return read_pin(self.root)

    def _chain(self, seq: int, found: dict[int, dict | str]) -> list[int]:
        """Seqs from ``seq``'s full snapshot to ``seq`` (VersionError naming the first broken link)."""
        chain, s, base = [], seq, None
        while True:
            m = found.get(s)
            if m is None:
                raise VersionError(f"{seq_name(seq)}: needs {seq_name(s)}, which is gone")
            if isinstance(m, str):
                raise VersionError(m if s == seq else f"{seq_name(seq)}: chain broken at {m}")
            refused = self._refused.get(s)
            if refused is not None and refused[0] == self._identity(s):
                raise VersionError(refused[1] if s == seq else f"{seq_name(seq)}: chain broken at {refused[1]}")
            if base is None:
                base = m["base"]
            elif m["base"] != base:
                raise VersionError(f"{seq_name(seq)}: chain broken: {seq_name(s)} builds on {seq_name(m['base'])}, "
                                   f"not {seq_name(base)}")
            chain.append(s)
            if m["kind"] == FULL:
                break
            s = m["prev"]
        return chain[::-1]

    # -- files -----------------------------------------------------------------------------------------
    def _read(self, seq: int, m: dict, name: str) -> bytes:
        """File ``name`` of version ``seq``, checked against the manifest (VersionError otherwise)."""
        want = m["files"].get(name)
        where = f"{seq_name(seq)}/{name}"
        if want is None:
            raise VersionError(f"{where}: not in the manifest")
        path = self.root / seq_name(seq) / name
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise VersionError(f"{where}: missing") from None
        except OSError as e:
            raise VersionError(f"{where}: unreadable: {e}") from None
        if len(data) != want["bytes"]:
            raise VersionError(f"{where}: {len(data)} bytes, the manifest says {want['bytes']} (truncated?)")
        if hashlib.sha256(data).hexdigest() != want["sha256"]:
            raise VersionError(f"{where}: sha256 differs from the manifest (corrupt)")
        return data

    def _tensors(self, seq: int, m: dict, name: str) -> dict:
        data = self._read(seq, m, name)
        try:
            st = tensor_load(data)
        except Exception as e:
            raise VersionError(f"{seq_name(seq)}/{name}: unreadable tensors: {e}") from e
        if not isinstance(st, dict):
            raise VersionError(f"{seq_name(seq)}/{name}: expected a dict of tensors")
        return st

    def _verify(self, seq: int, m: dict) -> None:
        """Hash every file of ``seq`` (cached per file identity)."""
        d = self.root / seq_name(seq)
        for name in m["files"]:
            p = d / name
            try:
                st = p.stat()
                ident = (st.st_ino, st.st_mtime_ns, st.st_size)
            except OSError:
                ident = ()
            if ident and self._verified.get(p) == ident:
                continue
            self._read(seq, m, name)
            self._verified[p] = ident

    # -- building --------------------------------------------------------------------------------------
    def _load_full(self, seq: int, m: dict) -> _Building:
        where = seq_name(seq)
        try:
            cfg = json.loads(self._read(seq, m, "config.json"))
            spec = json.loads(self._read(seq, m, "features.json"))
        except ValueError as e:
            raise VersionError(f"{where}: unreadable config.json/features.json: {e}") from e
        model, tcfg, dev = serving_model(cfg, spec, self.device, "auto", where, VersionError)
        load_dense(model, self._tensors(seq, m, "dense.pt"), f"{where}/dense.pt", VersionError)
        emb = self._tensors(seq, m, "embeddings.pt")
        w = emb.get("weights")
        want = (model.emb.num_tables, model.emb.rows, model.emb.dim)
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != want:
            raise VersionError(f"{where}/embeddings.pt: weights of shape {getattr(w, 'shape', None)}, "
                               f"the model needs {want}")
        load_serving_weights(model, w)
        widths = emb["widths"].reshape(-1).clone()
        shared = emb["shared"].reshape(-1).numpy().copy() if "shared" in emb else None
        view = None
        if "users.pt" in m["files"]:
            from trainer.users.features import UserVectors

            u = self._tensors(seq, m, "users.pt")
            view = UserVectors.from_state({"ids": u["ids"], "vectors": u["vectors"], "ad_table": u["ad_table"]})
        b = _Building(model, tcfg, dev, widths, shared, view, self._semantic_ids(seq, m, tcfg))
        if "early_stage.pt" in m["files"]:
            from trainer.early_stage import load_serving

            try:
                b.early_stage = load_serving(self._tensors(seq, m, "early_stage.pt"), tcfg, dev)
            except (ValueError, KeyError, IndexError) as e:
                raise VersionError(f"{where}/early_stage.pt: {e}") from e
        return b

    def _semantic_ids(self, seq: int, m: dict, tcfg, current=None):
        """The version's semantic IDs (``semantic_ids.pt``), else ``current`` (a delta without a change)."""
        if "semantic_ids.pt" not in m["files"]:
            if current is None and tcfg.ad_id_features != "hash" and not tcfg.sid_path and m.get("kind") == FULL:
                raise VersionError(f"{seq_name(seq)}: the model reads semantic IDs ({tcfg.ad_id_features}) but "
                                   "the version has no semantic_ids.pt")
            return current
        from embedding_store.semantic_ids import SemanticIds

        try:
            return SemanticIds.from_state(self._tensors(seq, m, "semantic_ids.pt"))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise VersionError(f"{seq_name(seq)}/semantic_ids.pt: malformed: {e}") from e

    def _copy(self, cur: Published) -> _Building:
        """A private copy of ``cur`` to apply deltas to (``cur`` keeps serving meanwhile)."""
        import copy

        try:  # a plain copy of every tensor: 3-10x faster than building a model (random init) and loading it
            model = copy.deepcopy(cur.model)
        except Exception:  # noqa: BLE001 - a module that cannot be deep-copied: build and load
            from trainer.embeddings import resolve_backend
            from trainer.model import MDMOModel

            model = MDMOModel(cur.tcfg, resolve_backend(cur.tcfg.backend, cur.device), cur.device)
            model.load_state_dict(dense_state(cur.model), strict=False)
            load_serving_weights(model, cur.model.emb.export_state()["weights"])
        model.eval()
        view = None
        if cur.user_view is not None:
            from trainer.users.features import UserVectors

            view = UserVectors.from_state(cur.user_view.state())
        widths = cur.embedding_widths.clone() if cur.embedding_widths is not None else None
        shared = cur.shared_slots.copy() if cur.shared_slots is not None else None
        b = _Building(model, cur.tcfg, cur.device, widths, shared, view, cur.semantic_ids)
        if getattr(cur, "early_stage", None) is not None:
            b.early_stage = copy.deepcopy(cur.early_stage)
        return b

    def _apply(self, b: _Building, seq: int, m: dict) -> None:
        """Apply delta ``seq`` to ``b`` in place (every file read and checked before anything changes)."""
        where = seq_name(seq)
        dense = self._tensors(seq, m, "dense.pt")
        rows = self._tensors(seq, m, "rows.pt")
        users = self._tensors(seq, m, "users.pt") if "users.pt" in m["files"] else None
        early = self._tensors(seq, m, "early_stage.pt") if "early_stage.pt" in m["files"] else None
        emb = b.model.emb
        n = emb.num_tables * emb.rows
        try:
            slots = rows["table"].numpy().astype(np.int64) * emb.rows + rows["row"].numpy().astype(np.int64)
            vecs, widths = rows["vectors"], rows["widths"]
            ok = (vecs.shape == (len(slots), emb.dim) and len(widths) == len(slots)
                  and (len(slots) == 0 or (slots.min() >= 0 and slots.max() < n))
                  and (rows["row"].numpy() < emb.rows).all())
        except (KeyError, AttributeError, TypeError) as e:
            raise VersionError(f"{where}/rows.pt: missing or malformed entries: {e}") from e
        if not ok:
            raise VersionError(f"{where}/rows.pt: rows do not fit the model ({emb.num_tables} x {emb.rows} x {emb.dim})")
        if (users is None) != (b.user_view is None):
            raise VersionError(f"{where}: user vectors {'missing' if users is None else 'unexpected'} in the delta")
        if early is not None and b.early_stage is None and "user_emb_weights" not in early:
            raise VersionError(f"{where}/early_stage.pt: a delta of an early stage the full snapshot does not have")
        sids = self._semantic_ids(seq, m, b.tcfg, b.semantic_ids)
        load_dense(b.model, dense, f"{where}/dense.pt", VersionError)
        b.semantic_ids = sids
        emb.write_rows(slots, vecs)
        if b.widths is not None:
            b.widths[torch.from_numpy(slots)] = widths.to(b.widths.dtype)
        if b.shared is not None and "shared" in rows:
            b.shared[slots] = rows["shared"].numpy()
        for t, vec, w in zip(rows["fill_tables"].tolist(), rows["fill_vectors"], rows["fill_widths"].tolist()):
            if b.shared is None:
                raise VersionError(f"{where}/rows.pt: shared rows but the full snapshot has none")
            idx = t * emb.rows + np.flatnonzero(b.shared[t * emb.rows:(t + 1) * emb.rows])
            emb.write_rows(idx, vec.expand(len(idx), -1))
            if b.widths is not None:
                b.widths[torch.from_numpy(idx)] = int(w)
        if early is not None:
            from trainer.early_stage import apply_serving, load_serving

            try:
                if b.early_stage is None or "user_emb_weights" in early:
                    b.early_stage = load_serving(early, b.tcfg, b.device)
                else:
                    apply_serving(b.early_stage, early)
            except (ValueError, KeyError, IndexError) as e:
                raise VersionError(f"{where}/early_stage.pt: {e}") from e
        if users is not None:
            v = b.user_view
            with torch.no_grad():
                if tuple(users["ad_shape"].tolist()) != tuple(v.ad_table.shape):
                    raise VersionError(f"{where}/users.pt: ad table shape changed")
                v.update(users["ids"].numpy(), users["vectors"].numpy())
                v.delete(users["deleted"].numpy())
                v.ad_table[users["ad_rows"]] = users["ad_vectors"]

    def _build(self, seq: int, found: dict[int, dict | str], start: Published | None = None) -> Published:
        chain = self._chain(seq, found)
        # incremental only from the very version on disk (same seq and write time: not another root's or a
        # rewritten one's)
        if (start is not None and start.seq in chain[:-1] and start.meta.get("base") == chain[0]
                and start.meta.get("created_ts") == found[start.seq].get("created_ts")):
            b, todo = self._copy(start), chain[chain.index(start.seq) + 1:]
        else:
            b, todo = self._load_full(chain[0], found[chain[0]]), chain[1:]
        for s in todo:
            self._apply(b, s, found[s])
        return b.published(found[seq])

    def _refuse(self, seq: int, e: VersionError) -> None:
        ident = self._identity(seq)
        known = self._refused.get(seq)
        if known is None or known[0] != ident:
            log.warning("refusing model version %s under %s: %s", seq_name(seq), self.root, e)
        self._refused[seq] = (ident, str(e))

    def _candidates(self, found: dict[int, dict | str], pin: int | None) -> list[int]:
        return [s for s in sorted(found, reverse=True)
                if isinstance(found[s], dict) and (pin is None or s <= pin)]

    # -- API -------------------------------------------------------------------------------------------
    def list(self) -> list[VersionInfo]:
        """Every version directory, oldest first, each checked in full (files hashed, chain complete)."""
        found = self._scan()
        pin = self.pinned()
        bad: dict[int, str] = {}
        for s, m in found.items():
            if isinstance(m, str):
                bad[s] = m
                continue
            try:
                self._verify(s, m)
            except VersionError as e:
                bad[s] = str(e)
        out = []
        for s, m in found.items():
            reason = bad.get(s, "")
            if not reason:
                try:
                    chain = self._chain(s, found)
                    broken = [c for c in chain if c in bad]
                    if broken:
                        reason = f"chain broken at {bad[broken[0]]}"
                except VersionError as e:
                    reason = str(e)
            mm = m if isinstance(m, dict) else {}
            size = sum(int(f.get("bytes", 0)) for f in mm.get("files", {}).values()) if mm else _dir_bytes(
                self.root / seq_name(s))
            out.append(VersionInfo(
                seq=s, kind=str(mm.get("kind", "?")), base=int(mm.get("base", 0) or 0), prev=mm.get("prev"),
                steps=int(mm.get("steps", 0)), examples_trained=int(mm.get("examples_trained", 0)),
                trained_ts=int(mm.get("trained_ts", 0)), created_ts=int(mm.get("created_ts", 0)), bytes=size,
                ok=not reason, reason=reason, pinned=s == pin, path=str(self.root / seq_name(s))))
        return out

    def refused(self) -> dict[int, str]:
        """Versions this store refused when loading or advancing ({seq: reason}), without hashing anything
        (cheap enough for a status page; :meth:`list` checks every version)."""
        return {s: r for s, (_, r) in sorted(self._refused.items())}

    def load(self, seq: int | None = None) -> Published:
        """Version ``seq``; None: the pinned one (if it cannot load, the newest older one that can), else the
        newest that loads. VersionError when there is none."""
        found = self._scan()
        if seq is not None:
            if seq not in found:
                raise VersionError(f"{self.root}: no version {seq}")
            return self._build(seq, found)
        pin = self.pinned()
        reasons = []
        for s in self._candidates(found, pin):
            try:
                return self._build(s, found)
            except VersionError as e:
                self._refuse(s, e)
                reasons.append(str(e))
        detail = f" ({'; '.join(reasons[:3])})" if reasons else ""
        raise VersionError(f"no usable model version under {self.root}"
                           + (f" at or below the pin {pin}" if pin is not None else "") + detail)

    def advance(self, current: Published | None) -> Published | None:
        """What to serve now if not ``current`` (None: keep it; see the module docstring). Never goes back to an
        older version unless one is pinned; a version that fails is refused (logged once) and skipped."""
        found = self._scan()
        pin = self.pinned()
        for s in self._candidates(found, pin):
            if current is not None and (s == current.seq or (s < current.seq and pin is None)):
                return None
            try:
                return self._build(s, found, start=current)
            except VersionError as e:
                self._refuse(s, e)
        return None


def _manifest_sha256(m: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own ``sha256`` field."""
    body = json.dumps({k: v for k, v in m.items() if k != "sha256"}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def _check_manifest(m: dict | None, seq: int, d: Path) -> dict | str:
    name = d.name
    if m is None:
        return f"{name}: {MANIFEST} is not a JSON object (damaged)"
    if m.get("sha256") != _manifest_sha256(m):
        return f"{name}: {MANIFEST} differs from its own sha256 (damaged)"
    if m.get("format") != FORMAT:
        return f"{name}: format {m.get('format')!r}, this code reads {FORMAT}"
    if m.get("seq") != seq:
        return f"{name}: the manifest says seq {m.get('seq')!r}"
    kind, base, prev = m.get("kind"), m.get("base"), m.get("prev")
    if kind == FULL and base != seq:
        return f"{name}: a full snapshot must be its own base, got {base!r}"
    if kind == DELTA and not (isinstance(prev, int) and isinstance(base, int) and base <= prev < seq):
        return f"{name}: a delta needs base <= prev < seq, got base {base!r} prev {prev!r}"
    if kind not in (FULL, DELTA):
        return f"{name}: unknown kind {kind!r}"
    files = m.get("files")
    need = {"dense.pt", *(("embeddings.pt", "config.json", "features.json") if kind == FULL else ("rows.pt",))}
    if not isinstance(files, dict) or not need <= set(files):
        return f"{name}: the manifest lists {sorted(files) if isinstance(files, dict) else files!r}, needs {sorted(need)}"
    for k in ("steps", "examples_trained", "trained_ts", "created_ts"):
        if not isinstance(m.get(k), int):
            return f"{name}: manifest field {k!r} missing or not an integer"
    for f, spec in files.items():
        if not (isinstance(spec, dict) and isinstance(spec.get("sha256"), str) and isinstance(spec.get("bytes"), int)):
            return f"{name}: manifest entry of {f!r} needs sha256 and bytes"
        if "/" in f or f.startswith("."):
            return f"{name}: bad file name {f!r} in the manifest"
    return m


def _dir_bytes(d: Path) -> int:
    try:
        return sum(p.stat().st_size for p in d.iterdir() if p.is_file())
    except OSError:
        return 0
