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
"""

from __future__ import annotations

import logging
import os
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
    return len(victims)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return  # e.g. platforms without directory fds
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
