"""Atomic trainer checkpoints: one file holds everything needed to continue exactly where training stood.

Contents (a dict saved with ``torch.save``, loaded with ``weights_only=True``)::

    format      int, CHECKPOINT_FORMAT
    learner     Learner.state(): dense weights, embedding weights + row-wise Adagrad momentum,
                Adam state, steps, RNG
    offsets     [[topic, partition, next_offset], ...]  (the next message to read; everything before it
                is in the weights)
    counters    {examples_trained, steps, duplicates, dead_letters, checkpoints, ...}
    dedup       [example_id, ...] the bounded window of trained ids, oldest first
    trained_ids [example_id, ...] or None (debug: every id the weights have absorbed, in order)
    config      the Config as plain data
    written_ts  wall-clock ms

Writing: to a temporary file in the same directory, ``fsync``, ``os.replace`` onto ``ckpt-<seq>.pt``, fsync
the directory; then keep only the newest :data:`KEEP` files. A crash at any moment leaves either the old or
the new checkpoint complete, never a torn one.

Several ranks (trainer/distributed.py): one checkpoint is a directory ``dist-<seq>/`` holding ``rank-<r>.pt``
for every rank (each the dict above with that rank's embedding shard, offsets, dedup and ids) and
``world.json``. Every rank writes its file into ``.dist-<seq>.tmp/`` at the same global step; after a barrier
rank 0 writes ``world.json`` and renames the directory into place: a checkpoint directory exists complete or
not at all. A directory of another rank count (or single-process files when resuming with several ranks, and
the reverse) is refused with a clear error (:func:`check_world`): shards are not resharded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = 1
KEEP = 2
PREFIX, SUFFIX = "ckpt-", ".pt"


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not match this trainer."""


def checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoint files in ``directory``, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(p for p in d.glob(f"{PREFIX}*{SUFFIX}") if p.name[len(PREFIX):-len(SUFFIX)].isdigit())


def latest(directory: str | os.PathLike) -> Path | None:
    found = checkpoints(directory)
    return found[-1] if found else None


def save(directory: str | os.PathLike, state: dict, seq: int, keep: int = KEEP) -> Path:
    """Write ``state`` atomically as checkpoint number ``seq``; returns its path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"{PREFIX}{seq:012d}{SUFFIX}"
    tmp = d / f".{final.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": CHECKPOINT_FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(d)
    for old in checkpoints(d)[:-keep]:
        old.unlink(missing_ok=True)
    return final


def load(path: str | os.PathLike) -> dict:
    """Load one checkpoint onto the CPU (tensors only; no arbitrary pickled code)."""
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated/corrupt file from outside this writer
        raise CheckpointError(f"checkpoint {path}: cannot load: {e}") from e
    if not isinstance(st, dict) or st.get("format") != CHECKPOINT_FORMAT:
        got = st.get("format") if isinstance(st, dict) else type(st).__name__
        raise CheckpointError(f"checkpoint {path}: expected format {CHECKPOINT_FORMAT}, got {got!r}")
    return st


def load_latest(directory: str | os.PathLike) -> tuple[Path, dict] | None:
    """The newest loadable checkpoint (falls back to the previous one if the newest is unreadable)."""
    errors = []
    for path in reversed(checkpoints(directory)):
        try:
            return path, load(path)
        except CheckpointError as e:
            log.error("%s; trying an older one", e)
            errors.append(str(e))
    if errors:
        raise CheckpointError("no loadable checkpoint: " + "; ".join(errors))
    return None


def clear(directory: str | os.PathLike) -> int:
    """Delete this module's checkpoint files (and stale temporaries) in ``directory``; returns how many."""
    d = Path(directory)
    if not d.is_dir():
        return 0
    victims = [*checkpoints(d), *d.glob(f".{PREFIX}*{SUFFIX}.*.tmp")]
    for p in victims:
        p.unlink(missing_ok=True)
    dirs = [*dist_checkpoints(d), *d.glob(f".{DIST_PREFIX}*.tmp")]
    for p in dirs:
        shutil.rmtree(p, ignore_errors=True)
    return len(victims) + len(dirs)


# ---- several ranks: one directory per checkpoint -------------------------------------------------------------
DIST_PREFIX = "dist-"


def dist_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete multi-rank checkpoint directories in ``directory``, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(p for p in d.glob(f"{DIST_PREFIX}*") if p.is_dir() and p.name[len(DIST_PREFIX):].isdigit()
                  and (p / "world.json").exists())


def check_world(directory: str | os.PathLike, world: int) -> None:
    """Refuse to resume ``world`` ranks from checkpoints written by another number of ranks."""
    if world == 1:
        found = dist_checkpoints(directory)
        if found:
            w = json.loads((found[-1] / "world.json").read_text())["world"]
            raise CheckpointError(f"checkpoint {found[-1]} was written by {w} ranks: resume with `streamrec train "
                                  f"--nproc {w}` (shards are not resharded), or start over with --fresh")
        return
    if checkpoints(directory):
        raise CheckpointError(f"checkpoint {latest(directory)} was written by one process: resume it without "
                              f"--nproc, or start over with --fresh (a single table is not resharded to {world} ranks)")
    found = dist_checkpoints(directory)
    if found:
        w = json.loads((found[-1] / "world.json").read_text())["world"]
        if w != world:
            raise CheckpointError(f"checkpoint {found[-1]} was written by {w} ranks, this run has {world}: resume "
                                  f"with --nproc {w} (shards are not resharded), or start over with --fresh")


def save_rank(directory: str | os.PathLike, state: dict, seq: int, rank: int) -> Path:
    """Write one rank's part of checkpoint ``seq`` into its temporary directory (fsynced)."""
    tmp = Path(directory) / f".{DIST_PREFIX}{seq:012d}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / f"rank-{rank}.pt"
    with open(path, "wb") as f:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    return path


def commit_dist(directory: str | os.PathLike, seq: int, world: int, keep: int = KEEP) -> Path:
    """Rank 0, after every rank's :func:`save_rank` (a barrier): check the files, write ``world.json``, rename
    the directory into place, fsync; keep the newest ``keep`` checkpoints."""
    d = Path(directory)
    tmp, final = d / f".{DIST_PREFIX}{seq:012d}.tmp", d / f"{DIST_PREFIX}{seq:012d}"
    missing = [r for r in range(world) if not (tmp / f"rank-{r}.pt").exists()]
    if missing:
        raise CheckpointError(f"checkpoint {seq}: ranks {missing} wrote no file into {tmp}")
    (tmp / "world.json").write_text(json.dumps({"world": world, "seq": seq}))
    _fsync_dir(tmp)
    if final.exists():  # a retry of the same seq after a restart that got that far: the new one wins
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(d)
    for old in [*dist_checkpoints(d)[:-keep], *d.glob(f".{DIST_PREFIX}*.tmp")]:  # + a crashed run's leftovers
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_dist_latest(directory: str | os.PathLike, world: int, rank: int) -> tuple[Path, dict] | None:
    """This rank's state in the newest complete multi-rank checkpoint (None when there is none)."""
    check_world(directory, world)
    found = dist_checkpoints(directory)
    if not found:
        return None
    path = found[-1] / f"rank-{rank}.pt"
    return path, load(path)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return  # e.g. platforms without directory fds
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
