"""``streamrec users``: nearest users and lookalike audiences from a snapshot of the user-vector index.

    streamrec users similar 42 -k 10              # the 10 users whose vectors are closest to user 42's
    streamrec users lookalike 42 7 19 -k 100      # the 100 users closest to the seeds' mean direction
    streamrec users info                          # size, kind, age of the vectors

The snapshot is the file the trainer writes at every checkpoint (``--index``, default ``<data_dir>/users/index``).
Each neighbour is printed with its cosine score and how old its vector is (now minus the event time of
the newest event the vector has seen).

>>> import numpy as np
>>> from embedding_store.ann import AnnConfig, make_index
>>> idx = make_index(AnnConfig(dim=2, kind="numpy"))
>>> idx.upsert(np.array([1, 2, 3, 4]), np.array([[1, 0], [1, 0.1], [0, 1], [1, -0.2]]), ts_ms=0)
>>> [n.user_id for n in similar(idx, 1, k=2)], [n.user_id for n in lookalike(idx, [1, 2], k=2)]
([2, 4], [4, 3])
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from embedding_store.ann import AnnError, AnnIndex, load_index, normalize


@dataclass(frozen=True)
class Neighbour:
    user_id: int
    score: float
    written_ts: int  # event-time ms of the vector


def _neighbours(index: AnnIndex, q: np.ndarray, k: int, exclude: set[int]) -> list[Neighbour]:
    scores, ids = index.search(q, k + len(exclude))
    keep = [(int(i), float(s)) for i, s in zip(ids[0].tolist(), scores[0].tolist()) if i >= 0 and i not in exclude]
    keep = keep[:k]
    ts = index.written_ts(np.array([i for i, _ in keep], dtype=np.int64)).tolist()
    return [Neighbour(i, s, t) for (i, s), t in zip(keep, ts)]


def similar(index: AnnIndex, user_id: int, k: int = 10) -> list[Neighbour]:
    """The k users nearest to ``user_id`` (itself excluded); AnnError when the user has no vector."""
    if user_id not in index:
        raise AnnError(f"similar: user {user_id} has no vector in the index ({len(index)} users)")
    return _neighbours(index, index.get(np.array([user_id])), k, {user_id})


def lookalike(index: AnnIndex, seeds: Sequence[int], k: int = 10) -> list[Neighbour]:
    """The k users nearest to the normalised mean of the seeds' vectors (seeds excluded); seeds without a
    vector are ignored, AnnError when none has one."""
    have = [s for s in dict.fromkeys(seeds) if s in index]
    if not have:
        raise AnnError(f"lookalike: none of the {len(seeds)} seed users has a vector in the index")
    centre = normalize(index.get(np.array(have)).mean(axis=0, keepdims=True))
    return _neighbours(index, centre, k, set(have))


def format_age(ms: float) -> str:
    """``1h02m``-style age; ``?`` for unknown.

    >>> format_age(3_725_000), format_age(42_000), format_age(-1)
    ('1h02m', '42s', '?')
    """
    if ms < 0:
        return "?"
    s = int(ms // 1000)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _table(rows: list[Neighbour], now_ms: int) -> str:
    lines = [f"{'rank':>4}  {'user_id':>12}  {'score':>7}  {'age':>8}  written (event time, UTC)"]
    for r, n in enumerate(rows, 1):
        when = datetime.fromtimestamp(n.written_ts / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S") \
            if n.written_ts >= 0 else "?"
        age = format_age(now_ms - n.written_ts if n.written_ts >= 0 else -1)
        lines.append(f"{r:>4}  {n.user_id:>12}  {n.score:7.4f}  {age:>8}  {when}")
    return "\n".join(lines)


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("users", help="nearest users and lookalike audiences from the user-vector index",
                              description="Query a snapshot of the FAISS index of user-model vectors.")
    p.add_argument("--index", metavar="PATH", help="index snapshot (default: <data_dir>/users/index, or "
                   "<data_dir>/users/<arm>/index with --arm)")
    p.add_argument("--arm", default=None, help="the arm whose trainer wrote the index (default: trainer.arm, main)")
    p.add_argument("--kind", choices=("numpy", "exact", "ivf"), help="load the snapshot as this kind "
                   "(default: the kind it was saved as)")
    sub = p.add_subparsers(dest="users_command", metavar="QUERY", required=True)
    s = sub.add_parser("similar", help="the k users closest to one user")
    s.add_argument("user_id", type=int)
    s.add_argument("-k", type=int, default=10)
    s = sub.add_parser("lookalike", help="the k users closest to a set of seed users")
    s.add_argument("seeds", type=int, nargs="+", metavar="SEED_ID")
    s.add_argument("-k", type=int, default=10)
    sub.add_parser("info", help="size, kind and vector ages of the index")
    p.set_defaults(func=run)


def index_path(cfg, arm: str | None = None) -> Path:
    """The default snapshot: where the trainer writes the user-vector index at each checkpoint. Each arm's
    trainer has its own user model (``<data_dir>/users/<arm>/index``), except the default arm ``main``, which
    keeps ``<data_dir>/users/index``.

    >>> from config import Config
    >>> index_path(Config(data_dir="d")).as_posix(), index_path(Config(data_dir="d"), "B").as_posix()
    ('d/users/index', 'd/users/B/index')
    """
    arm = cfg.trainer.arm if arm is None else arm
    return Path(cfg.data_dir, "users", "index") if arm == "main" else Path(cfg.data_dir, "users", arm, "index")


def run(args: argparse.Namespace, cfg) -> int:
    path = Path(args.index) if args.index else index_path(cfg, args.arm)
    if not path.exists():
        print(f"streamrec users: no index snapshot at {path} (the trainer writes it at every checkpoint: run `streamrec up` or `streamrec train`, or pass --index)",
              file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        index = load_index(path, kind=args.kind)
        load_s = time.perf_counter() - t0
        now_ms = int(time.time() * 1000)
        if args.users_command == "info":
            ts = index.written_ts(index.ids())
            c = index.cfg
            ivf = f", nlist {c.nlist}, nprobe {c.nprobe}, {c.quantizer} quantizer" if c.kind == "ivf" else ""
            print(f"{path}: {len(index)} users, dim {c.dim}, kind {c.kind}{ivf}, loaded in {load_s:.2f} s")
            if len(ts):
                ages = now_ms - ts
                print("vector age: newest " + format_age(float(ages.min())) + ", median "
                      + format_age(float(np.median(ages))) + ", oldest " + format_age(float(ages.max())))
            return 0
        t1 = time.perf_counter()
        if args.users_command == "similar":
            rows = similar(index, args.user_id, args.k)
            head = f"users similar to {args.user_id}"
        else:
            rows = lookalike(index, args.seeds, args.k)
            missing = [s for s in args.seeds if s not in index]
            head = f"lookalike of {len(args.seeds) - len(missing)} seed users" + \
                (f" ({len(missing)} without a vector: {missing[:10]})" if missing else "")
    except AnnError as e:
        print(f"streamrec users: {e}", file=sys.stderr)
        return 1
    print(f"{head}: {len(rows)} of {len(index)} users, kind {index.cfg.kind}, "
          f"query {1000 * (time.perf_counter() - t1):.1f} ms")
    print(_table(rows, now_ms))
    return 0
