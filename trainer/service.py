"""The trainer process: ``streamrec train``, its signals and its malloc settings, around the loop of
``trainer/loop.py``.

This module imports no torch: the command's parser stays fast; :func:`run` imports the loop when it trains.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from config import NO_BROKER, Config, arm_trainer_config, replace

log = logging.getLogger("streamrec.trainer")


def runtime_env() -> dict[str, str]:
    """Process settings the trainer starts with (each read only at process start; a value already in the
    environment wins):

    * glibc malloc: no per-step page faults on large tensors. M_MMAP_THRESHOLD above 32 MiB is silently ignored
      by 64-bit glibc (its documented maximum), so use that; keep freed memory (no trimming) and grow the heap
      in large steps (doubled fbgemm training speed here).
    * ``OMP_WAIT_POLICY=PASSIVE``: torch's OpenMP threads sleep at the end of a parallel region instead of
      spinning. On cores other work shares (a busy node, a container's CPU limit) a spinning thread waits for a
      partner that is not running: measured on 2 cores with other work, a trainer test took 41-47 s with
      libgomp's default and 9 s passive (and 9 s on one thread); on idle cores the two are alike.
    """
    want = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(4 << 30),
            "MALLOC_TOP_PAD_": str(256 << 20), "OMP_WAIT_POLICY": "PASSIVE"}
    return {k: os.environ.get(k, v) for k, v in want.items()}


def run_trainer(cfg: Config, *, resume: bool, max_examples: int | None = None, idle_exit_s: float | None = None,
                record_ids: bool = False, export_dir: str | None = None, publish_dir: str | None = None
                ) -> dict[str, int]:
    """Train until SIGTERM/SIGINT, ``max_examples`` or ``idle_exit_s`` idle seconds; returns the counters."""
    from trainer.loop import Trainer  # torch and the model: only when training

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one rank of several, under torchrun (trainer/distributed.py)
        from trainer.distributed import DistributedTrainer as Trainer
    svc = Trainer(cfg, resume=resume, record_ids=record_ids, export_dir=export_dir, publish_dir=publish_dir)
    old = {s: signal.signal(s, svc.stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return svc.run(max_examples=max_examples, idle_exit_s=idle_exit_s)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _reexec_with_runtime_env() -> None:
    """Replace this process with the same command plus :func:`runtime_env` (read only at process start)."""
    want = runtime_env()
    if all(k in os.environ for k in want):
        return
    env = {**os.environ, **want}
    root = str(Path(__file__).resolve().parents[1])  # the project root, so `-m deploy.cli` imports from anywhere
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "deploy.cli", *sys.argv[1:]], env)


def torchrun_command(nproc: int, train_args: list[str], max_restarts: int = 3) -> list[str]:
    """The torchrun command line of ``streamrec train --nproc N``: one host, ``nproc`` ranks, the elastic
    agent restarting the whole group up to ``max_restarts`` times after a rank fails; every rank runs
    ``deploy.cli ... train --resume`` (the newest complete checkpoint, if any)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts), "-m", "deploy.cli", *train_args]


def _worker_args(argv: list[str]) -> list[str]:
    """This command's arguments for the ranks: without --nproc/--max-restarts/--fresh, with --resume."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--nproc", "--max-restarts"):
            skip = True
            continue
        if a.startswith(("--nproc=", "--max-restarts=")) or a == "--fresh":
            continue
        out.append(a)
    return out + ([] if "--resume" in out else ["--resume"])


def launch_ranks(args: argparse.Namespace, cfg: Config, argv: list[str]) -> int:
    """``--nproc N``: check the settings, handle --fresh here (a restarted rank must not delete the group's
    checkpoints), then run torchrun as a child until it exits; SIGTERM/SIGINT are passed on to it."""
    import subprocess

    from trainer import checkpoint
    from trainer.distributed import unsupported

    bad = unsupported(cfg, args.nproc)
    if getattr(args, "export_dir", None) or getattr(args, "publish_dir", None):
        bad.append("--export-dir / --publish-dir: a rank holds 1/W of the tables; publish from one process")
    if bad:
        print(f"streamrec train --nproc {args.nproc}: " + "; ".join(bad), file=sys.stderr)
        return 2
    if args.fresh:
        n = checkpoint.clear(cfg.trainer.checkpoint_dir)
        if n:
            log.warning("--fresh: deleted %d checkpoint(s) in %s", n, cfg.trainer.checkpoint_dir)
    elif not args.resume and (checkpoint.latest(cfg.trainer.checkpoint_dir)
                              or checkpoint.dist_checkpoints(cfg.trainer.checkpoint_dir)):
        print(f"streamrec train: a checkpoint exists in {cfg.trainer.checkpoint_dir}: pass --resume to continue "
              "from it, or --fresh to delete it and start over", file=sys.stderr)
        return 2
    try:
        checkpoint.check_world(cfg.trainer.checkpoint_dir, args.nproc)
    except checkpoint.CheckpointError as e:
        print(f"streamrec train: {e}", file=sys.stderr)
        return 2
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, **runtime_env(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = torchrun_command(args.nproc, _worker_args(argv), args.max_restarts)
    log.info("starting %d ranks: %s", args.nproc, " ".join(cmd))
    child = subprocess.Popen(cmd, env=env, cwd=root)
    asked: list[int] = []

    def forward(sig, _frame):  # the agent passes it to the ranks: they agree to stop, checkpoint, exit
        asked.append(sig)
        child.send_signal(sig)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        rc = child.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if rc != 0 and asked:  # torchrun's agent exits 1 after passing a signal on, even when every rank stopped cleanly
        log.info("the ranks were asked to stop (signal %d); torchrun exited %d", asked[0], rc)
        return 0
    return 0 if rc == 0 else 1


def run(args: argparse.Namespace, cfg: Config) -> int:
    if not cfg.kafka.bootstrap_servers:
        print(f"streamrec train: {NO_BROKER}", file=sys.stderr)
        return 2
    if args.resume and args.fresh:
        print("streamrec train: --resume and --fresh exclude each other", file=sys.stderr)
        return 2
    # only when launched as a command (`streamrec train` / `python -m deploy.cli train`), not called in-process
    if Path(sys.argv[0]).name in ("streamrec", "cli.py") and "train" in sys.argv[1:]:
        _reexec_with_runtime_env()
    if getattr(args, "arm", None):  # one arm's trainer (serving.arms): its overrides, checkpoints, versions
        try:
            cfg = arm_trainer_config(cfg, args.arm)
        except KeyError as e:
            print(f"streamrec train: --arm: {e.args[0]}", file=sys.stderr)
            return 2
    if args.checkpoint_dir:
        cfg = replace(cfg, trainer={"checkpoint_dir": args.checkpoint_dir})
    if getattr(args, "nproc", 1) > 1:
        return launch_ranks(args, cfg, sys.argv[1:])
    from trainer import checkpoint  # torch: only when training
    from trainer.embeddings import quiet_fbgemm_logs

    quiet_fbgemm_logs()

    if args.fresh:
        n = checkpoint.clear(cfg.trainer.checkpoint_dir)
        if n:
            log.warning("--fresh: deleted %d checkpoint file(s) in %s", n, cfg.trainer.checkpoint_dir)
    try:
        run_trainer(cfg, resume=args.resume, max_examples=args.max_examples, idle_exit_s=args.idle_exit,
                    record_ids=args.record_trained_ids, export_dir=getattr(args, "export_dir", None),
                    publish_dir=getattr(args, "publish_dir", None))
    except (checkpoint.CheckpointError, ValueError) as e:  # ValueError: a trainer setting the model rejects
        print(f"streamrec train: {e}", file=sys.stderr)
        return 2
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="run the continuous trainer on the examples topic",
                       description="Consume labelled examples, score each micro-batch (progressive validation), "
                                   "train on it, and checkpoint model + optimizer + offsets atomically. SIGTERM or "
                                   "Ctrl-C finishes the batch, checkpoints and exits 0.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from the latest checkpoint (if any)")
    mode.add_argument("--fresh", action="store_true", help="delete existing checkpoints and start from the beginning")
    p.add_argument("--max-examples", type=int, metavar="N", help="stop after training N examples")
    p.add_argument("--idle-exit", type=float, metavar="S", help="stop after S seconds without new examples")
    p.add_argument("--arm", metavar="NAME",
                   help="train the arm NAME of serving.arms: the trainer section with the arm's overrides, its "
                        "learn_from, checkpoints in <trainer.checkpoint_dir>/NAME (the single default arm 'main': "
                        "trainer.checkpoint_dir itself) and versions published to <models_dir>/NAME (docs/arms.md)")
    p.add_argument("--checkpoint-dir", metavar="DIR", help="checkpoint directory (default: trainer.checkpoint_dir)")
    p.add_argument("--export-dir", metavar="DIR",
                   help="also write a serving export (trainer/export.py) at every checkpoint, for `score --model`")
    p.add_argument("--publish-dir", metavar="DIR",
                   help="publish model versions for serving here (trainer/publish.py: a delta every "
                        "trainer.publish_every_s, a full snapshot every trainer.publish_full_every versions; "
                        "default: trainer.publish_dir, '' = none); `streamrec serve` reads <serving.models_dir>/<arm>")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train with N ranks on this host under torchrun (trainer/distributed.py: each rank reads "
                        "its own partitions, embedding tables sharded row-wise, dense gradients averaged, one "
                        "checkpoint directory for all ranks; a failed rank restarts the group from it). The same "
                        "as `python -m torch.distributed.run --standalone --nproc-per-node N -m deploy.cli train "
                        "--resume` (several hosts: --nnodes/--rdzv-endpoint instead of --standalone; docs/trainer.md)")
    p.add_argument("--max-restarts", type=int, default=3, metavar="K",
                   help="with --nproc: restarts of the whole group after a rank fails (torchrun --max-restarts)")
    p.add_argument("--record-trained-ids", action="store_true",
                   help="debug: keep every trained example id in the checkpoint (grows without bound)")
    p.set_defaults(func=run)
