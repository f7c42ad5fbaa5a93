"""``streamrec score (--model EXPORT | --checkpoint DIR) INPUT.jsonl [--out FILE]``: score impressions.

``--model`` takes a serving export (:mod:`trainer.export`: the root, newest version, or one version
directory) or a publish root (:mod:`trainer.publish`: the pinned or newest valid version, or one version
directory); ``--checkpoint`` a training checkpoint directory or file. ``streamrec export --checkpoint DIR
--out EXPORT`` turns the newest checkpoint into an export.

Input: one JSON Impression per line, as ``schema.encode`` writes it (an Example line is accepted too and
its impression scored). Bad lines are reported on stderr with their line number and skipped. Output:
JSONL ``{"event_id", "p_click", "p_conversion"}`` in input order.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterable, Iterator, Union

import msgspec

from streams import schema
from config import Config, TrainerConfig

CHUNK = 4096
_Line = Union[schema.Impression, schema.Example]


class ScoreRow(msgspec.Struct, frozen=True):
    event_id: str
    p_click: float
    p_conversion: float


def load_learner(checkpoint_path: str | Path, device: str = "auto", backend: str = "auto"):
    """A :class:`~trainer.model.Learner` restored from a checkpoint file or the newest one in a directory.

    ``backend=auto`` restores a FIITED checkpoint into a FIITED store: only that store reads its state
    (fixed-width states load into either fixed-width backend).
    """
    from trainer import checkpoint
    from trainer.model import Learner

    p = Path(checkpoint_path)
    if p.is_dir():
        found = checkpoint.load_latest(p)
        if found is None:
            raise checkpoint.CheckpointError(f"no checkpoint in {p}")
        p, st = found
    else:
        st = checkpoint.load(p)
    if backend == "auto" and st["learner"].get("backend") == "fiited":
        backend = "fiited"
    tc = msgspec.convert({**st["config"]["trainer"], "device": device, "backend": backend}, TrainerConfig)
    learner = Learner(tc)
    learner.load_state(st["learner"])
    return learner


def load_model(path: str | Path, device: str = "auto", backend: str = "auto"):
    """A scoring model from a serving export (trainer/export.py) or a publish root or version directory
    (trainer/publish.py: ``vNNN/manifest.json``); raises ExportError / VersionError."""
    from trainer.export import load as load_export
    from trainer.publish import MANIFEST, VersionStore

    p = Path(path)
    if (p / MANIFEST).is_file() and p.name[1:].isdigit():  # one published version
        return VersionStore(p.parent, device).load(int(p.name[1:]))
    if p.is_dir() and any((d / MANIFEST).is_file() for d in p.glob("v*")):
        return VersionStore(p, device).load()
    return load_export(p, device, backend)


def read_impressions(lines: Iterable[bytes], errors) -> Iterator[schema.Impression]:
    """Decoded impressions; bad lines go to ``errors(lineno, reason)``."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        ev = schema.decode(line, _Line)
        if isinstance(ev, schema.Example):
            ev = ev.impression
        if isinstance(ev, schema.Invalid):
            errors(n, ev.reason)
        else:
            yield ev


def score_impressions(learner, imps: list[schema.Impression]) -> list[ScoreRow]:
    """Score without changing the model; ``imps`` of any length (chunked)."""
    import torch

    from trainer.features import impression_batch

    rows: list[ScoreRow] = []
    for i in range(0, len(imps), CHUNK):
        chunk = imps[i:i + CHUNK]
        with torch.no_grad():
            pc, pv = learner.model(impression_batch(chunk, learner.tcfg, learner.device, learner.user_view,
                                                    sids=getattr(learner, "semantic_ids", None)))
        rows.extend(ScoreRow(im.event_id, float(a), float(c))
                    for im, a, c in zip(chunk, pc.cpu().tolist(), pv.cpu().tolist()))
    return rows


def run(args: argparse.Namespace, cfg: Config) -> int:
    from trainer.checkpoint import CheckpointError
    from trainer.embeddings import quiet_fbgemm_logs

    quiet_fbgemm_logs()

    bad = 0

    def report(n: int, reason: str) -> None:
        nonlocal bad
        bad += 1
        print(f"{args.input}:{n}: skipped: {reason}", file=sys.stderr)

    from trainer.export import ExportError
    from trainer.publish import VersionError

    try:
        if getattr(args, "model", None):
            learner = load_model(args.model, cfg.trainer.device, cfg.trainer.backend)
        else:
            learner = load_learner(args.checkpoint, cfg.trainer.device, cfg.trainer.backend)
    except (CheckpointError, ExportError, VersionError, OSError, ValueError) as e:  # ValueError: other settings
        print(f"streamrec score: {e}", file=sys.stderr)
        return 2
    try:
        with open(args.input, "rb") as f:
            imps = list(read_impressions(f, report))
    except OSError as e:
        print(f"streamrec score: {e}", file=sys.stderr)
        return 2
    rows = score_impressions(learner, imps)
    enc = msgspec.json.Encoder()
    out = open(args.out, "wb") if args.out else sys.stdout.buffer
    try:
        for r in rows:
            out.write(enc.encode(r) + b"\n")
    finally:
        if args.out:
            out.close()
        else:
            out.flush()
    print(f"scored {len(rows)} impressions, skipped {bad} bad line(s) (model version {learner.steps})",
          file=sys.stderr)
    return 0


def run_export(args: argparse.Namespace, cfg: Config) -> int:
    """``streamrec export``: newest checkpoint -> a new version in the export root."""
    from trainer.checkpoint import CheckpointError
    from trainer.export import export

    try:
        learner = load_learner(args.checkpoint, "cpu", cfg.trainer.backend)
    except (CheckpointError, OSError, ValueError) as e:  # ValueError: a backend that cannot read the state
        print(f"streamrec export: {e}", file=sys.stderr)
        return 2
    path = export(learner, args.out)
    print(f"exported model version {learner.steps} to {path}", file=sys.stderr)
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score impressions (JSONL) with an exported model or a checkpoint",
                       description="Read one Impression per line, write {event_id, p_click, p_conversion} JSONL.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="DIR", help="model export (root: the LATEST version; or a version dir), "
                     "or a publish root (`train --publish-dir`: the pinned or newest valid version; or a version dir)")
    src.add_argument("--checkpoint", metavar="DIR", help="checkpoint directory (newest used) or file")
    p.add_argument("input", metavar="INPUT.jsonl")
    p.add_argument("--out", metavar="FILE", help="output file (default: stdout)")
    p.set_defaults(func=run)
    e = sub.add_parser("export", help="export the newest trainer checkpoint as a versioned serving artifact",
                       description="Write EXPORT/vNNN/{model.pt,config.json,features.json,version.json} and "
                                   "EXPORT/LATEST from the newest checkpoint (no optimizer state).")
    e.add_argument("--checkpoint", required=True, metavar="DIR", help="checkpoint directory (newest used) or file")
    e.add_argument("--out", required=True, metavar="EXPORT", help="export root directory")
    e.set_defaults(func=run_export)
