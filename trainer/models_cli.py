"""``streamrec models list|rollback``: the published model versions of an arm (trainer/publish.py).

``list`` shows every version directory with its checks (files hashed, chain complete); ``rollback SEQ``
pins a version after loading it (serving then stays on it), ``rollback --latest`` removes the pin (serving
follows the newest valid version again). The root is ``--dir``, else ``<serving.models_dir>/<--arm>``.

This module imports no torch: the command's parser stays fast; torch comes with the version store.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from config import Config


def _root(args: argparse.Namespace, cfg: Config) -> Path:
    return Path(args.dir) if args.dir else Path(cfg.models_dir()) / args.arm


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _list(args: argparse.Namespace, cfg: Config) -> int:
    from trainer.publish import VersionStore

    root = _root(args, cfg)
    if not root.is_dir():
        print(f"streamrec models: no publish root {root} (train with --publish-dir, or pass --dir/--arm)",
              file=sys.stderr)
        return 2
    infos = VersionStore(root).list()
    if args.json:
        from dataclasses import asdict

        print(json.dumps([asdict(i) for i in infos], indent=1))
        return 0
    if not infos:
        print(f"{root}: no versions yet")
        return 0
    head = f"{'seq':>6} {'kind':5} {'base':>6} {'steps':>9} {'examples':>10} {'created':19} {'size':>9}  {'pin':3}  status"
    print(f"{root}:")
    print(head)
    for i in infos:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i.created_ts / 1000)) if i.created_ts else "-"
        status = "ok" if i.ok else f"REFUSED: {i.reason}"
        print(f"{i.seq:>6} {i.kind:5} {i.base:>6} {i.steps:>9} {i.examples_trained:>10} {created:19} "
              f"{_fmt_bytes(i.bytes):>9}  {'*' if i.pinned else '':3}  {status}")
    return 0


def _rollback(args: argparse.Namespace, cfg: Config) -> int:
    from trainer.publish import VersionError, VersionStore, read_pin, write_pin

    root = _root(args, cfg)
    if not root.is_dir():
        print(f"streamrec models rollback: no publish root {root}", file=sys.stderr)
        return 2
    if args.latest:
        old = read_pin(root)
        write_pin(root, None)
        print(f"{root}: unpinned (was {old}); serving follows the newest valid version" if old is not None
              else f"{root}: no pin; serving follows the newest valid version")
        return 0
    try:
        p = VersionStore(root).load(args.seq)  # the pin is written only for a version that loads
    except VersionError as e:
        print(f"streamrec models rollback: version {args.seq} does not load, not pinned: {e}", file=sys.stderr)
        return 1
    write_pin(root, args.seq)
    print(f"{root}: pinned version {p.seq} ({p.steps} steps, {p.examples_trained} examples); "
          "`streamrec models rollback --latest` unpins")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list published model versions, roll back (pin) or unpin",
                       description="The model versions the trainer publishes for serving (trainer/publish.py): "
                                   "full snapshots and deltas, checksummed. Root: --dir, else "
                                   "<serving.models_dir>/<arm>.")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--arm", default="main", help="the arm whose versions (default: main)")
        q.add_argument("--dir", metavar="ROOT", help="the publish root (default: <serving.models_dir>/<arm>)")

    ls = msub.add_parser("list", help="every version: seq, kind, base, steps, examples, created, size, ok or why not, pin",
                         description="List the versions of a publish root; each is checked (every file's sha256, "
                                     "the delta chain back to its full snapshot). Exit 0.")
    common(ls)
    ls.add_argument("--json", action="store_true", help="JSON instead of a table")
    ls.set_defaults(func=_list)
    rb = msub.add_parser("rollback", help="pin a version (serving switches to it), or --latest to unpin",
                         description="Pin version SEQ: the ranking service serves it until unpinned. The version "
                                     "must load (checksums, chain, feature spec) or nothing is pinned (exit 1).")
    common(rb)
    which = rb.add_mutually_exclusive_group(required=True)
    which.add_argument("seq", type=int, nargs="?", metavar="SEQ", help="the version to pin")
    which.add_argument("--latest", action="store_true", help="remove the pin: serve the newest valid version")
    rb.set_defaults(func=_rollback)
