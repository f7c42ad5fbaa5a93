"""The continuous trainer: examples topic -> progressive validation -> train -> checkpoint.

Per micro-batch: consume up to ``batch_size`` messages (``assign()`` at the checkpointed offsets, no
consumer group), decode (bad ones -> dead letters), drop already-trained example ids, score the batch with
the current model and publish a :class:`~streams.schema.PredictionBatch`, then train on it.

Exactly-once effect on the weights: the checkpoint stores weights, optimizer states, the dedup window and
the next offset of every partition together, atomically. After a crash ``--resume`` restarts from that
consistent point: messages after it are re-read and trained once (their predictions and dead letters are
published again: at-least-once there, keyed by example id for idempotent sinks).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections import deque
from pathlib import Path

import msgspec
import numpy as np

from streams import schema
from streams.bus import kafka_io
from streams.config import NO_BROKER, Config

log = logging.getLogger("streamrec.trainer")
DEDUP_CAPACITY = 2_000_000  # example ids remembered (oldest forgotten first)
STATS_EVERY_S = 1.0
LOG_EVERY_S = 10.0
_GROUP = "streamrec-trainer"  # required by librdkafka; never joined (assign() only, no commits)


def malloc_env() -> dict[str, str]:
    """glibc malloc settings that stop per-step page faults on large tensors.

    M_MMAP_THRESHOLD above 32 MiB is silently ignored by 64-bit glibc (its documented maximum), so use that;
    keep freed memory (no trimming) and grow the heap in large steps.
    """
    return {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(4 << 30),
            "MALLOC_TOP_PAD_": str(256 << 20)}


class Dedup:
    """A bounded set of recently trained ids (FIFO eviction): ``add(id)`` is False if already present."""

    def __init__(self, capacity: int = DEDUP_CAPACITY, ids: list[str] | None = None):
        self.capacity = capacity
        self._order: deque[str] = deque(ids or ())
        self._set = set(self._order)

    def __contains__(self, key: str) -> bool:
        return key in self._set

    def __len__(self) -> int:
        return len(self._set)

    def add(self, key: str) -> bool:
        if key in self._set:
            return False
        self._set.add(key)
        self._order.append(key)
        if len(self._order) > self.capacity:
            self._set.discard(self._order.popleft())
        return True

    def ids(self) -> list[str]:
        return list(self._order)


class _Stats:
    """Throughput, freshness and latency over the last stats interval.

    ``event_to_trained``: trained (wall ms) - impression ts, includes the label wait;
    ``emitted_to_trained``: trained - emitted_ts (the labels dataflow's output time): the trainer's own delay;
    ``lag_ms``: now - emitted_ts of the newest trained example (how far the model is behind the stream).
    """

    def __init__(self):
        self.t0 = time.monotonic()
        self.examples = 0
        self.lat_ms: list[np.ndarray] = []
        self.emit_lat_ms: list[np.ndarray] = []
        self.newest_emitted_ts = 0

    def add(self, event_ts: np.ndarray, now_ms: int, emitted_ts: np.ndarray | None = None) -> None:
        self.examples += len(event_ts)
        self.lat_ms.append(now_ms - event_ts)
        if emitted_ts is not None and len(emitted_ts):
            ok = emitted_ts > 0
            self.emit_lat_ms.append(now_ms - emitted_ts[ok])
            if ok.any():
                self.newest_emitted_ts = max(self.newest_emitted_ts, int(emitted_ts[ok].max()))

    def take(self, now_ms: int | None = None) -> dict[str, float]:
        now = time.monotonic()
        out = {"examples_per_s": self.examples / max(now - self.t0, 1e-9)}
        for name, parts in (("event_to_trained", self.lat_ms), ("emitted_to_trained", self.emit_lat_ms)):
            lat = np.concatenate(parts) if parts else np.zeros(0)
            if lat.size:
                out[f"{name}_p50_ms"] = float(np.percentile(lat, 50))
                out[f"{name}_p99_ms"] = float(np.percentile(lat, 99))
        if self.newest_emitted_ts:
            out["lag_ms"] = float((now_ms or int(time.time() * 1000)) - self.newest_emitted_ts)
        self.t0, self.examples, self.lat_ms, self.emit_lat_ms = now, 0, [], []
        return out


class TrainerService:
    """One trainer process. ``run()`` until stopped, idle, or ``max_examples`` trained."""

    def __init__(self, cfg: Config, *, resume: bool, record_ids: bool = False, export_dir: str | None = None):
        from trainer import checkpoint
        from trainer.model import Learner
        from trainer.user_features import user_worker

        self.cfg, self.tc = cfg, cfg.trainer
        self.export_dir = export_dir or cfg.trainer.export_dir
        self.ckpt_dir = Path(self.tc.checkpoint_dir)
        found = checkpoint.latest(self.ckpt_dir)
        if found and not resume:
            raise checkpoint.CheckpointError(
                f"checkpoint {found} exists: pass --resume to continue from it, or --fresh to delete it and "
                "start over")
        self.learner = Learner(self.tc, elapsed_s=cfg.labels.elapsed_s)
        self.users = user_worker(cfg) if self.tc.user_model else None
        if self.users is not None:
            self.learner.user_view = self.users.view
        self.offsets: dict[tuple[str, int], int] = {}
        self.counters = {"examples_trained": 0, "steps": 0, "duplicates": 0, "dead_letters": 0, "checkpoints": 0}
        self.dedup = Dedup()
        self.trained_ids: list[str] | None = [] if record_ids else None
        self.newest_event_ts = 0
        loaded = checkpoint.load_latest(self.ckpt_dir) if resume else None
        if loaded:
            path, st = loaded
            self.restore(st)
            log.info("resumed from %s: %d examples trained, %d steps, offsets %s", path,
                     self.counters["examples_trained"], self.counters["steps"], self.offsets)
        elif resume:
            log.info("--resume: no checkpoint in %s yet; starting from the beginning", self.ckpt_dir)
        self._stop = False
        self._pace_at = 0.0  # see _throttled
        self._last_ckpt_t = time.monotonic()
        self._last_ckpt_n = self.counters["examples_trained"]
        self._last_ckpt_offsets = dict(self.offsets)

    # ---- state ---------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"learner": self.learner.state(),
                "offsets": [[t, p, o] for (t, p), o in sorted(self.offsets.items())],
                "counters": dict(self.counters), "dedup": self.dedup.ids(),
                "trained_ids": None if self.trained_ids is None else list(self.trained_ids),
                "newest_event_ts": self.newest_event_ts,
                **({"users": self.users.state()} if self.users is not None else {}),
                "config": msgspec.to_builtins(self.cfg), "written_ts": int(time.time() * 1000)}

    def restore(self, st: dict) -> None:
        self.learner.load_state(st["learner"])
        self.offsets = {(t, int(p)): int(o) for t, p, o in st["offsets"]}
        self.counters.update(st["counters"])
        self.dedup = Dedup(DEDUP_CAPACITY, st["dedup"])
        if st.get("trained_ids") is not None:
            self.trained_ids = list(st["trained_ids"])
        self.newest_event_ts = int(st.get("newest_event_ts", 0))
        if self.users is not None and "users" in st:
            self.users.load_state(st["users"])
            self.learner.user_view = self.users.view  # the live table, not the checkpoint's frozen copy

    def checkpoint(self) -> Path:
        from trainer import checkpoint

        # predictions and dead letters of checkpointed batches are out before the offsets move
        kafka_io.flush_all(self.producer, "trainer checkpoint", log)
        self.counters["checkpoints"] += 1
        t = time.monotonic()
        st = self.state()
        path = checkpoint.save(self.ckpt_dir, st, seq=self.counters["checkpoints"])
        log.debug("checkpoint %s in %.2fs", path, time.monotonic() - t)
        self._last_ckpt_t, self._last_ckpt_n = time.monotonic(), self.counters["examples_trained"]
        self._last_ckpt_offsets = dict(self.offsets)
        if self.users is not None:  # for `streamrec users`: the index as of this checkpoint
            from embedding_store.users import index_path
            from trainer.user_service import write_index_file

            write_index_file(st["users"], index_path(self.cfg))
        if self.export_dir:  # serving artifacts follow the checkpoints
            from trainer.export import export

            export(self.learner, self.export_dir, examples_trained=self.counters["examples_trained"],
                   keep=self.tc.export_keep)
        return path

    # ---- one batch -----------------------------------------------------------------------------
    def process(self, msgs: list) -> int:
        """Decode, dedup, score+publish, train; returns how many examples were trained."""
        from trainer.features import featurize

        now_ms = int(time.time() * 1000)
        good: list[schema.Example] = []
        for m in msgs:
            err = m.error()
            if err is not None:
                kafka_io.consumer_error(err, "trainer consumer", log)
                continue
            self.offsets[(m.topic(), m.partition())] = m.offset() + 1
            ex = schema.decode(m.value() or b"", schema.Example)
            if isinstance(ex, schema.Invalid):
                self._dead_letter(ex.reason, m, now_ms)
            elif self.dedup.add(ex.example_id):
                good.append(ex)
            else:
                self.counters["duplicates"] += 1
        if not good:
            return 0
        fb = featurize(good, self.tc, self.learner.user_view)

        def publish(p_click: np.ndarray, p_conv: np.ndarray) -> None:
            pb = schema.PredictionBatch(
                model_version=self.learner.steps, trained_ts=int(time.time() * 1000), example_ids=fb.example_ids,
                domains=fb.domains, event_ts=fb.event_ts.tolist(), emitted_ts=fb.emitted_ts.tolist(),
                p_click=p_click.tolist(), p_conversion=p_conv.tolist(), click=fb.click.astype(int).tolist(),
                conversion=fb.conversion.astype(int).tolist())
            kafka_io.produce(self.producer, self.cfg.topics.predictions, schema.encode(pb))

        self.learner.train_step(fb, before_update=publish)
        self.counters["steps"] = self.learner.steps
        self.counters["examples_trained"] += len(good)
        if self.trained_ids is not None:
            self.trained_ids.extend(fb.example_ids)
        self.newest_event_ts = max(self.newest_event_ts, int(fb.event_ts.max()))
        if self.users is not None:  # the user model learns from the batch after the ranker did
            self.users.submit(good)
        self._stats.add(fb.event_ts, int(time.time() * 1000), fb.emitted_ts)
        return len(good)

    def _dead_letter(self, reason: str, m, now_ms: int) -> None:
        self.counters["dead_letters"] += 1
        dl = schema.dead_letter(reason, m.value() or b"", topic=m.topic(), partition=m.partition(),
                                offset=m.offset(), ts=now_ms, step="trainer.decode")
        kafka_io.produce(self.producer, self.cfg.topics.dead_letters, schema.encode(dl))

    def _publish_stats(self) -> None:
        now = int(time.time() * 1000)
        values = {k: float(self.counters[k]) for k in ("examples_trained", "steps", "duplicates", "dead_letters")}
        values.update(self._stats.take(now))
        values["model_version"] = float(self.learner.steps)
        for name, h in self.learner.delays.items():  # the delay distribution the ES-DFM weights use
            if h.total:
                values[f"{name}_delay_p50_ms"] = h.quantile(0.5)
                values[f"{name}_delayed_share"] = h.survival(self.learner.elapsed_ms)
        if self.newest_event_ts:
            values["freshness_ms"] = float(now - self.newest_event_ts)
        report = getattr(self.learner.model.emb, "memory_report", None)  # FIITED: bytes per pool, dims
        if report is not None:
            values.update(report())
        if self.users is not None:
            values.update(self.users.stats())
        st = schema.ServiceStats(component="trainer", ts=now, values=values, instance=f"pid{os.getpid()}")
        kafka_io.produce(self.producer, self.cfg.topics.service_stats, schema.encode(st))

    # ---- loop ----------------------------------------------------------------------------------
    def stop(self, *_args) -> None:
        """Finish the current batch, checkpoint and return from :meth:`run` (signal-safe)."""
        self._stop = True

    def run(self, max_examples: int | None = None, idle_exit_s: float | None = None) -> dict[str, int]:
        import torch

        cfg, tc = self.cfg, self.tc
        bs = cfg.kafka.bootstrap_servers
        self.producer = kafka_io.make_producer(bs, cfg.kafka.client)
        consumer = kafka_io.make_consumer(bs, _GROUP, cfg.kafka.client)
        consumer.assign(kafka_io.topic_partitions([cfg.topics.examples], cfg.topics.partitions, self.offsets))
        self._stats = _Stats()
        log.info("training on %s (%d partitions), backend=%s device=%s batch=%d, checkpoints in %s",
                 cfg.topics.examples, cfg.topics.partitions, self.learner.backend, self.learner.device,
                 tc.batch_size, self.ckpt_dir)
        start_n = self.counters["examples_trained"]
        last_msg = last_stats = last_log = time.monotonic()
        threads = torch.get_num_threads()
        if self.users is not None:
            # two threads run torch ops at once (ranker, user model), each with its own OpenMP team: half the
            # cores each, or the teams spin against each other (measured: `up` 100k took 15.5 s, 12 s with this)
            torch.set_num_threads(max(1, threads // 2))
        try:
            while not self._stop:
                throttled = self._throttled()
                msgs = [] if throttled else consumer.consume(num_messages=tc.batch_size, timeout=0.2)
                now = time.monotonic()
                if msgs or throttled:  # a throttled trainer is busy, not idle
                    last_msg = now
                if msgs:
                    self._pace(now, self.process(msgs))
                self.producer.poll(0)
                done = self.counters["examples_trained"] - start_n
                if (self.counters["examples_trained"] - self._last_ckpt_n >= tc.checkpoint_every_examples
                        or (now - self._last_ckpt_t >= tc.checkpoint_every_s and self._dirty())):
                    self.checkpoint()
                if now - last_stats >= STATS_EVERY_S:
                    self._publish_stats()
                    last_stats = now
                if now - last_log >= LOG_EVERY_S:
                    self._log_progress()
                    last_log = now
                if max_examples is not None and done >= max_examples:
                    log.info("trained %d examples (--max-examples); stopping", done)
                    break
                if idle_exit_s is not None and now - last_msg >= idle_exit_s:
                    log.info("no examples for %.1fs (--idle-exit); stopping", idle_exit_s)
                    break
            self.checkpoint()
            self._publish_stats()
            self._log_progress()
        finally:
            consumer.close()
            kafka_io.flush_all(self.producer, "trainer", log)
            if self.users is not None:
                self.users.close()
            torch.set_num_threads(threads)  # the process's setting again (in-process callers: tests, benchmarks)
        return dict(self.counters)

    # trainer.max_examples_per_s > 0: after a batch of n examples that started at t, the next starts at
    # t + n / rate at the earliest (no credit for idle time); meanwhile nothing new is taken
    def _throttled(self) -> bool:
        if self.tc.max_examples_per_s <= 0 or time.monotonic() >= self._pace_at:
            return False
        time.sleep(min(0.05, max(0.0, self._pace_at - time.monotonic())))
        return True

    def _pace(self, started: float, n: int) -> None:
        if self.tc.max_examples_per_s > 0:
            self._pace_at = max(self._pace_at, started) + n / self.tc.max_examples_per_s

    def _dirty(self) -> bool:
        return self.offsets != self._last_ckpt_offsets

    def _log_progress(self) -> None:
        c = self.counters
        log.info("trained %d examples in %d steps (duplicates %d, dead letters %d), checkpoints %d",
                 c["examples_trained"], c["steps"], c["duplicates"], c["dead_letters"], c["checkpoints"])


class _QuietFbgemm(logging.Filter):
    """fbgemm_gpu logs dozens of INFO lines through the root logger at import and TBE creation."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "fbgemm_gpu" not in record.pathname


def run_trainer(cfg: Config, *, resume: bool, max_examples: int | None = None, idle_exit_s: float | None = None,
                record_ids: bool = False, export_dir: str | None = None) -> dict[str, int]:
    """Train until SIGTERM/SIGINT, ``max_examples`` or ``idle_exit_s`` idle seconds; returns the counters."""
    svc = TrainerService(cfg, resume=resume, record_ids=record_ids, export_dir=export_dir)
    old = {s: signal.signal(s, svc.stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return svc.run(max_examples=max_examples, idle_exit_s=idle_exit_s)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _reexec_with_malloc_env() -> None:
    """Replace this process with the same command plus :func:`malloc_env` (glibc reads it only at start)."""
    want = malloc_env()
    if all(k in os.environ for k in want):
        return
    env = {**os.environ, **want}
    root = str(Path(__file__).resolve().parents[1])  # the project root, so `-m deploy.cli` imports from anywhere
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "deploy.cli", *sys.argv[1:]], env)


def run(args: argparse.Namespace, cfg: Config) -> int:
    if not cfg.kafka.bootstrap_servers:
        print(f"streamrec train: {NO_BROKER}", file=sys.stderr)
        return 2
    if args.resume and args.fresh:
        print("streamrec train: --resume and --fresh exclude each other", file=sys.stderr)
        return 2
    # only when launched as a command (`streamrec train` / `python -m deploy.cli train`), not called in-process
    if Path(sys.argv[0]).name in ("streamrec", "cli.py") and "train" in sys.argv[1:]:
        _reexec_with_malloc_env()
    if args.checkpoint_dir:
        from streams.config import replace
        cfg = replace(cfg, trainer={"checkpoint_dir": args.checkpoint_dir})
    for h in logging.getLogger().handlers:
        h.addFilter(_QuietFbgemm())
    from trainer import checkpoint

    if args.fresh:
        n = checkpoint.clear(cfg.trainer.checkpoint_dir)
        if n:
            log.warning("--fresh: deleted %d checkpoint file(s) in %s", n, cfg.trainer.checkpoint_dir)
    try:
        run_trainer(cfg, resume=args.resume, max_examples=args.max_examples, idle_exit_s=args.idle_exit,
                    record_ids=args.record_trained_ids, export_dir=getattr(args, "export_dir", None))
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
    p.add_argument("--checkpoint-dir", metavar="DIR", help="checkpoint directory (default: trainer.checkpoint_dir)")
    p.add_argument("--export-dir", metavar="DIR",
                   help="also write a serving export (trainer/export.py) at every checkpoint, for `score --model`")
    p.add_argument("--record-trained-ids", action="store_true",
                   help="debug: keep every trained example id in the checkpoint (grows without bound)")
    p.set_defaults(func=run)
