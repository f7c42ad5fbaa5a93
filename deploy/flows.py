"""``streamrec labels``, ``streamrec stats`` and ``streamrec distill``: the dataflows as commands, alone or as a local Bytewax cluster.

A cluster on one machine (``--local-processes N``) is N processes of ``streamrec labels --process-id i
--addresses ...`` on free local ports; across hosts, run one such process per host with the same
``--addresses``. Kafka partitions spread over every worker of every process.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import yaml

from streams.bus.processes import free_port
from config import NO_BROKER, Config, replace
from streams.flows.service import run_distill, run_labels, run_stats

log = logging.getLogger("streamrec.flows")


def local_cluster(cfg: Config, command: str, processes: int, args: list[str], timeout: float | None = None) -> list[int]:
    """Run ``processes`` processes of ``streamrec COMMAND ARGS`` on this machine as one Bytewax cluster;
    returns their exit codes. Each child gets ``cfg`` as a YAML file and its ``--process-id``."""
    if processes < 1:
        raise ValueError(f"{command}: --local-processes must be >= 1, got {processes}")
    addresses = ",".join(f"127.0.0.1:{free_port()}" for _ in range(processes))
    with tempfile.TemporaryDirectory(prefix=f"{command}-cluster-") as tmp:
        conf = Path(tmp, "config.yaml")
        conf.write_text(yaml.safe_dump(msgspec.to_builtins(cfg)))
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
        root = str(Path(__file__).resolve().parents[1])  # the project root, so `-m deploy.cli` imports from anywhere
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
        base = [sys.executable, "-m", "deploy.cli", "--config", str(conf), command, *args,
                "--processes", str(processes), "--addresses", addresses]
        procs = [subprocess.Popen(base + ["--process-id", str(i)], env=env) for i in range(processes)]
        try:
            return [p.wait(timeout) for p in procs]
        finally:
            for p in procs:  # on error or timeout: stop the children we started, by pid
                if p.poll() is None:
                    p.kill()
                    p.wait()


def _run(command: str, runner, args: argparse.Namespace, cfg: Config) -> int:
    if not cfg.kafka.bootstrap_servers:
        print(f"streamrec {command}: {NO_BROKER}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        if args.local_processes:
            child = ["--workers", str(args.workers)] + (["--bounded"] if args.bounded else [])
            child += ["--epoch-s", str(args.epoch_s)] if args.epoch_s is not None else []
            wait = getattr(args, "teacher_wait_s", None)  # distill's
            child += ["--teacher-wait-s", str(wait)] if wait is not None else []
            codes = local_cluster(cfg, command, args.local_processes, child)
            if any(codes):
                print(f"streamrec {command}: process exit codes {codes}", file=sys.stderr)
                return 1
        else:
            addresses = args.addresses.split(",") if args.addresses else None
            if addresses is not None and args.processes is not None and len(addresses) != args.processes:
                raise ValueError(f"{command}: --processes {args.processes} but {len(addresses)} --addresses")
            runner(cfg, args, workers=args.workers, epoch_s=args.epoch_s, process_id=args.process_id,
                   addresses=addresses)
    except ValueError as e:
        print(f"streamrec {command}: {e}", file=sys.stderr)
        return 2
    log.info("%s finished in %.1fs", command, time.perf_counter() - t0)
    return 0


def _labels(cfg: Config, args: argparse.Namespace, **run) -> None:
    if args.recovery_dir:
        cfg = replace(cfg, labels={"recovery_dir": args.recovery_dir})
    run_labels(cfg, bounded=args.bounded, **run)


def _stats(cfg: Config, args: argparse.Namespace, **run) -> None:
    run_stats(cfg, bounded=args.bounded, recovery_dir=args.recovery_dir or "", **run)


def _distill(cfg: Config, args: argparse.Namespace, **run) -> None:
    upd = {"recovery_dir": args.recovery_dir} if args.recovery_dir else {}
    if args.teacher_wait_s is not None:
        upd["teacher_wait_s"] = args.teacher_wait_s
    run_distill(replace(cfg, distill=upd) if upd else cfg, bounded=args.bounded, **run)


def _add_flow(sub: argparse._SubParsersAction, command: str, runner, help: str, description: str,
              recovery_help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(command, help=help, description=description)
    p.add_argument("--bounded", action="store_true",
                   help="stop once every input partition is read to its end (default: keep tailing)")
    p.add_argument("--workers", type=int, default=1, help="Bytewax worker threads in this process (default 1)")
    p.add_argument("--recovery-dir", metavar="DIR", default=None, help=recovery_help)
    p.add_argument("--epoch-s", type=float, default=None,
                   help="snapshot (epoch) interval in seconds; what a crash replays (default: Bytewax's 10 s)")
    g = p.add_argument_group("scale-out (one Bytewax cluster; Kafka partitions spread over all workers)")
    g.add_argument("--processes", type=int, default=None, help="number of processes in the cluster")
    g.add_argument("--process-id", type=int, default=None, help="this process's index in --addresses")
    g.add_argument("--addresses", default=None, metavar="HOST:PORT,...",
                   help="every process's address, in process-id order")
    g.add_argument("--local-processes", type=int, default=0, metavar="N",
                   help="launch an N-process cluster on this machine (free local ports) and wait for it")
    p.set_defaults(func=lambda args, cfg: _run(command, runner, args, cfg))
    return p


def add_cli(sub: argparse._SubParsersAction) -> None:
    _add_flow(sub, "labels", _labels, "run the labels dataflow (join impressions, clicks, conversions)",
              "Run the Bytewax labels dataflow: read the impressions, clicks and conversions topics partition by "
              "partition, join feedback to impressions inside each objective's attribution window, and write "
              "labelled examples to the examples topic and bad or unmatched records to the dead_letters topic.",
              "Bytewax recovery directory (created and initialised if empty); overrides labels.recovery_dir")
    _add_flow(sub, "stats", _stats, "run the stats dataflow (feature / label statistics per window)",
              "Read the examples topic and publish per-window, per-domain feature and label statistics "
              "(histograms, quantiles, heavy hitters, label rates and delays) to the feature_stats topic with "
              "deterministic ids.", "Bytewax recovery directory (created and initialised if empty)")
    p = _add_flow(sub, "distill", _distill, "run the teacher-join dataflow (examples + FM predictions -> VMs)",
                  "Run the Bytewax distill dataflow (ExFM's data augmentation): read the examples and the "
                  "teacher_predictions topics partition by partition, attach to each example the foundation "
                  "model's prediction for it, and write it to the examples_distilled topic that vertical models "
                  "(trainer.role vm) train on. An example waits for its teacher at most distill.teacher_wait_s "
                  "and goes on without one past it (counted); late teachers are dropped, never applied twice; bad "
                  "teacher records become dead letters with a reason.",
                  "Bytewax recovery directory (created and initialised if empty); overrides distill.recovery_dir")
    p.add_argument("--teacher-wait-s", type=float, default=None, metavar="S",
                   help="longest wall-clock wait of an example for its teacher (overrides distill.teacher_wait_s)")
