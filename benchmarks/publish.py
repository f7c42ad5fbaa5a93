"""Continuous publishing at steady state: delta size against a full snapshot, time to write and to apply.

A generator stream (zipf users and ads, ``streams.sources.generate``) trains the default model (hash_buckets
100k, 12 tables, dim 16, the user model beside it) in 512-example batches; a version is published every
``rate * interval`` examples (default 3000 examples/s x 5 s = 15k examples: the trainer's
``publish_every_s`` at that rate, in stream time, so the sizes do not depend on this machine's speed).
After a warm-up, the deltas' sizes are compared with the full snapshot's; each delta is applied by a reader
(:meth:`trainer.publish.VersionStore.advance`, on a copy of the version it serves).

Baseline: the full snapshot (its bytes and write time); ``value``: the mean delta fraction (goal <= 0.10).

    streamrec bench publish [--quick] [--backend fbgemm|torch|fiited] [--rate 3000] [--interval 5]
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import parser, report, timer


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="auto", help="trainer.backend (default auto)")
    p.add_argument("--rate", type=float, default=3000.0, help="examples per second of stream time")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between versions (publish_every_s)")
    p.add_argument("--deltas", type=int, default=6, help="deltas measured after the warm-up")
    p.add_argument("--no-user-model", action="store_true", help="without the user model (no user vectors)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows, out = measure(backend=args.backend, rate=args.rate, interval=args.interval,
                        deltas=2 if args.quick else args.deltas, warm=2 if args.quick else 4,
                        user_model=not args.no_user_model)
    report("publish", rows, ("version", "MB", "fraction", "rows", "users", "ad rows", "write s", "apply s", "train s"),
           value=out["delta_fraction"], unit="delta bytes / full bytes", baseline=1.0, **out)


def measure(*, backend: str = "auto", rate: float = 3000.0, interval: float = 5.0, deltas: int = 6, warm: int = 4,
            user_model: bool = True) -> tuple[list[tuple[str, ...]], dict]:
    """Train and publish as the module docstring says; ``(table rows, figures)``: ``delta_fraction`` (mean over
    the measured deltas), ``delta_fraction_max``, ``full_mb``, ``full_write_s``, ``full_load_s``,
    ``delta_write_s`` and ``delta_apply_s`` (medians), ``examples_per_version``, ``backend``."""
    import torch

    from benchmarks._simulated import example_stream
    from config import Config, replace
    from streams.sources.generate import GeneratorConfig, simulate
    from trainer.features import featurize
    from trainer.model import Learner
    from trainer.publish import Publisher, VersionStore
    from trainer.users.features import user_worker

    per_version = int(rate * interval)
    n_deltas = deltas
    n = per_version * (warm + n_deltas + 1)
    cfg = replace(Config(), trainer={"device": "cpu", "backend": backend, "user_model": user_model,
                                     "publish_full_every": 1000})
    sim = simulate(GeneratorConfig(n_impressions=n, seed=1, impressions_per_s=rate, n_users=50_000))
    examples = example_stream(sim, "oracle", elapsed_s=60)
    learner = Learner(cfg.trainer)
    users = user_worker(cfg) if cfg.trainer.user_model else None
    if users is not None:
        learner.user_view = users.view
    root = tempfile.mkdtemp(prefix="streamrec-publish-")
    pub = Publisher(root, full_every=1000, keep_full=2)
    store = VersionStore(root)
    rows, fractions, writes, applies, served = [], [], [], [], None
    full_bytes, full_write_s, full_load_s = 0, 0.0, 0.0
    bs = cfg.trainer.batch_size
    try:
        for v in range(warm + n_deltas + 1):
            chunk = examples[v * per_version:(v + 1) * per_version]
            with timer() as tt:
                for i in range(0, len(chunk), bs):
                    batch = chunk[i:i + bs]
                    learner.train_step(featurize(batch, cfg.trainer, learner.user_view))
                    if users is not None:
                        users.submit(batch)
                if users is not None:
                    users.drain()  # the user vectors of this interval, re-encoded (as they would be by now)
            info = pub.publish(learner, examples_trained=(v + 1) * per_version, full=(v == 0))
            with timer() as ta:
                served = store.advance(served)
            assert served is not None and served.seq == info.seq
            st = pub.stats()
            if v == 0:
                full_bytes, full_write_s, full_load_s = info.bytes, st["publish_s"], ta["s"]
            counts = json.loads(Path(info.path, "manifest.json").read_text())["counts"]
            rows.append((f"v{info.seq} {info.kind}", f"{info.bytes / 1e6:.2f}", f"{st['delta_fraction']:.4f}",
                         str(counts.get("rows", "")), str(counts.get("users", "")), str(counts.get("ad_rows", "")),
                         f"{st['publish_s']:.3f}", f"{ta['s']:.3f}", f"{tt['s']:.1f}"))
            if v > warm:
                fractions.append(st["delta_fraction"])
                writes.append(st["publish_s"])
                applies.append(ta["s"])
    finally:
        if users is not None:
            users.close()
        shutil.rmtree(root, ignore_errors=True)
    frac = float(np.mean(fractions))
    return rows, dict(
        delta_fraction=round(frac, 4), delta_fraction_max=round(float(np.max(fractions)), 4),
        full_mb=round(full_bytes / 1e6, 2), full_write_s=round(full_write_s, 3), full_load_s=round(full_load_s, 3),
        delta_write_s=round(float(np.median(writes)), 3), delta_apply_s=round(float(np.median(applies)), 3),
        examples_per_version=per_version, backend=learner.backend, torch_threads=torch.get_num_threads(),
        at=time.strftime("%Y-%m-%dT%H:%M:%S"))


if __name__ == "__main__":
    main()
