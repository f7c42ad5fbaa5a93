"""The trainer across ranks: ``streamrec train --nproc N`` or ``torchrun ... -m deploy.cli train``.

Each rank is one process started by ``torch.distributed.run`` (torchrun's elastic agent), with gloo on the CPU:

* **Input**: rank ``r`` of ``W`` reads the examples topic's partitions ``p`` with ``p % W == r``
  (:func:`rank_partitions`), with ``assign()`` at its checkpointed offsets: no consumer group, nothing
  rebalances. Partitions are keyed by user, so each user's examples reach one rank.
* **Steps in lockstep**: every iteration each rank takes up to ``batch_size / W`` messages (the same total
  batch as one process), then one small all-reduce agrees on the global step: how many examples each rank has,
  whether any rank wants a checkpoint or to stop, whether all are idle. A rank with no examples still takes
  part in the step (:func:`trainer.sharded.empty_batch_step`), so every rank runs the same collectives.
* **Model**: the embedding tables are sharded row-wise over the ranks (:mod:`trainer.sharded`, with why not
  TorchRec's DMP); the dense parameters are replicated and their gradients summed, each weighted by its rank's
  share of the global batch (:class:`trainer.sharded.DenseGradSync`), so every rank applies the same update
  (what DDP does, in one flat all-reduce per step; rank 0's initial dense weights are broadcast at a fresh start).
* **One consistent checkpoint**: at the same global step every rank flushes its output, writes its file (its
  shard, offsets, dedup window, counters, ids) into one temporary directory; after a barrier rank 0 renames the
  directory into place (trainer/checkpoint.py). When is decided collectively: every
  ``checkpoint_every_examples`` examples of all ranks together, when any rank's ``checkpoint_every_s`` timer
  is due, and at the end.
* **Failure**: SIGKILL of one rank breaks the others' next collective (gloo: connection closed by peer); the
  agent stops the group and starts it again (``--max-restarts``), every rank resumes from the newest complete
  checkpoint directory: the weights, offsets and dedup windows of one global step, so every example is trained
  exactly once (``--record-trained-ids``; tests/test_scale.py).

Not supported with several ranks, refused at start with the setting to change: the FIITED backend (its
variable-width store is not sharded), CUDA (the exchange is written for gloo on CPU tensors), the user model,
LoopFM, SOLARIS, distillation (roles fm/vm), the early stage, semantic IDs, C2AL, precision other than fp32, ``learn_from: own`` (each scores outside the
lockstep step), and serving exports/published versions (a rank holds 1/W of the tables).

Service statistics come from rank 0 for the group (``examples_trained`` of all ranks, ``ranks``); its
throughput and latency figures are its own.
"""

from __future__ import annotations

import datetime

import logging
import os
import threading
import time

import msgspec
import torch
import torch.distributed as dist

from config import Config
from streams import schema
from streams.bus import kafka_io
from streams.names import Stat
from trainer import checkpoint
from trainer.loop import _GROUP, Trainer
from trainer.sharded import empty_batch_step, shard_learner, sharded_tables
from trainer.telemetry import Throughput, service_stats

log = logging.getLogger("streamrec.trainer")
_FLAGS = ("examples", "stop", "checkpoint_due", "idle")
GROUP_FORM_TIMEOUT_S = 60.0  # joining the group takes well under a second when the peers are up
EXIT_GROUP_TIMEOUT = 75  # a rank's exit code when its group did not form in time (init_group)


def init_group(rank: int, world: int, form_timeout_s: float = GROUP_FORM_TIMEOUT_S) -> None:
    """Join the gloo group of this restart attempt; a collective stuck on a dead peer fails after 2 minutes
    (gloo's default: 30).

    Each attempt's group lives under its own prefix of the rendezvous store (``TORCHELASTIC_RESTART_COUNT``):
    torchrun's store outlives a restart, and without the prefix a restarted rank read its peer's address of
    the attempt before (the SIGKILLed rank's port) and either failed (``connectFullMesh ... Connection refused``)
    or waited forever for a connection from a dead peer, restart after restart. Forming the group also has a
    watchdog: a rank whose group has not formed within ``form_timeout_s`` exits with
    :data:`EXIT_GROUP_TIMEOUT`, so the agent starts the group again (one of ``--max-restarts``) rather than
    hanging."""
    formed = threading.Event()

    def watchdog() -> None:
        if not formed.wait(form_timeout_s):
            log.error("rank %d/%d: the process group did not form within %.0f s (gloo could not connect the ranks); "
                      "exiting %d so that torchrun starts the group again", rank, world, form_timeout_s,
                      EXIT_GROUP_TIMEOUT)
            logging.shutdown()
            os._exit(EXIT_GROUP_TIMEOUT)

    threading.Thread(target=watchdog, name="group-watchdog", daemon=True).start()
    timeout = datetime.timedelta(seconds=120)
    try:
        store, rank, world = next(dist.rendezvous("env://", rank, world, timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"streamrec/attempt-{attempt}", store)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    finally:
        formed.set()


def world_from_env() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them (RANK, WORLD_SIZE); (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def rank_partitions(partitions: int, rank: int, world: int) -> list[int]:
    """The partitions rank ``rank`` of ``world`` consumes: ``p % world == rank`` (disjoint, together all)."""
    if world > partitions:
        raise ValueError(f"{world} ranks but the examples topic has {partitions} partitions: a rank would get "
                         "none; use at most topics.partitions ranks")
    return [p for p in range(partitions) if p % world == rank]


def unsupported(cfg: Config, world: int) -> list[str]:
    """The settings that several ranks cannot train with, each saying what to set (empty: fine)."""
    tc = cfg.trainer
    out = []
    if tc.backend == "fiited":
        out.append("trainer.backend fiited: the FIITED store is not sharded; use backend auto, torch or fbgemm")
    if tc.device not in ("auto", "cpu"):
        out.append(f"trainer.device {tc.device}: the sharded tables run on the CPU with gloo; use device cpu")
    if tc.role != "ranker":
        out.append(f"trainer.role {tc.role}: only the ranker role trains on several ranks")
    if tc.teacher_weight > 0:
        out.append("trainer.teacher_weight > 0: distillation is not supported on several ranks")
    if tc.ad_id_features != "hash":
        out.append(f"trainer.ad_id_features {tc.ad_id_features}: semantic IDs are not supported on several ranks "
                   "(each rank would code ads on its own); use hash")
    if tc.precision != "fp32":
        out.append(f"trainer.precision {tc.precision}: the LoKA probe and dispatch run in one process; use fp32")
    for flag in ("user_model", "loopfm", "solaris", "early_stage", "c2al"):
        if getattr(tc, flag, False):
            out.append(f"trainer.{flag}: not supported on several ranks; set it to false")
    if tc.learn_from == "own":
        out.append("trainer.learn_from own: not supported on several ranks")
    if tc.publish_dir or tc.export_dir:
        out.append("trainer.publish_dir / export_dir: a rank holds 1/W of the tables; publish from one process")
    if world > cfg.topics.partitions:
        out.append(f"{world} ranks > topics.partitions {cfg.topics.partitions}: a rank would read nothing")
    return out


class DistributedTrainer(Trainer):
    """One rank of the multi-rank trainer (module docstring); ``run()`` like :class:`trainer.loop.Trainer`."""

    def __init__(self, cfg: Config, *, resume: bool, record_ids: bool = False, export_dir: str | None = None,
                 publish_dir: str | None = None):
        self.rank, self.world = world_from_env()
        bad = unsupported(cfg, self.world)
        if export_dir or publish_dir:
            bad.append("--export-dir / --publish-dir: a rank holds 1/W of the tables; publish from one process")
        if bad:
            raise ValueError(f"--nproc {self.world}: " + "; ".join(bad))
        if not dist.is_initialized():
            init_group(self.rank, self.world)
        with sharded_tables():  # this rank's shard only, never the whole tables
            super().__init__(cfg, resume=False, record_ids=record_ids, export_dir="", publish_dir="")
        lr, tc = self.learner, self.tc
        self.sync = shard_learner(lr)
        self.partitions = rank_partitions(cfg.topics.partitions, self.rank, self.world)
        self.local_batch = max(1, tc.batch_size // self.world)
        self.global_trained = 0  # examples trained by all ranks together (identical on every rank)
        loaded = checkpoint.load_dist_latest(self.ckpt_dir, self.world, self.rank) if resume else None
        if loaded:
            path, st = loaded
            self.restore(st)
            self.global_trained = int(st["dist"]["global_trained"])
            log.info("rank %d/%d resumed from %s: %d examples trained here (%d by all ranks), offsets %s",
                     self.rank, self.world, path, self.counters["examples_trained"], self.global_trained, self.offsets)
        else:
            if resume:
                log.info("rank %d/%d: no checkpoint in %s yet; starting from the beginning", self.rank, self.world,
                         self.ckpt_dir)
            for k, p in lr.model.state_dict().items():  # the same initial dense weights everywhere (as DDP does)
                if not k.startswith("emb.") and p.is_floating_point():
                    dist.broadcast(p, 0)
        self._last_ckpt_n = self.global_trained
        self._last_ckpt_offsets = dict(self.offsets)

    def state(self) -> dict:
        return {**super().state(), "dist": {"world": self.world, "rank": self.rank, "partitions": self.partitions,
                                            "global_trained": self.global_trained}}

    def _publish_stats(self) -> None:
        """Rank 0 reports for the group (one series per arm, as with one process): ``examples_trained`` and
        ``steps`` of all ranks together, ``ranks``; throughput and latency figures are rank 0's own."""
        if self.rank != 0:
            return
        st = service_stats(self, self._stats)
        values = {**st.values, Stat.EXAMPLES_TRAINED.value: float(self.global_trained), "ranks": float(self.world)}
        kafka_io.produce(self.producer, self.cfg.topics.service_stats,
                         schema.encode(msgspec.structs.replace(st, values=values)))

    def checkpoint(self):
        """Collective: every rank's file of this global step, then rank 0 commits the directory."""
        kafka_io.flush_all(self.producer, "trainer checkpoint", log)
        self.counters["checkpoints"] += 1
        seq = self.counters["checkpoints"]
        checkpoint.save_rank(self.ckpt_dir, self.state(), seq, self.rank)
        dist.barrier()
        path = None
        if self.rank == 0:
            path = checkpoint.commit_dist(self.ckpt_dir, seq, self.world)
        dist.barrier()
        self._last_ckpt_t, self._last_ckpt_n = time.monotonic(), self.global_trained
        self._last_ckpt_offsets = dict(self.offsets)
        return path

    def step(self, good, src, total: int) -> None:
        """One global step: this rank's ``good`` examples (maybe none) among ``total`` of all ranks."""
        share = len(good) / total
        self.learner.model.emb.share = share
        self.sync.share = share
        if good:
            self.train_examples(good, src)
        else:
            empty_batch_step(self.learner)
            self.counters["steps"] = self.learner.steps
        self.global_trained += total

    def run(self, max_examples: int | None = None, idle_exit_s: float | None = None) -> dict[str, int]:
        cfg, tc = self.cfg, self.tc
        bs = cfg.kafka.bootstrap_servers
        self.producer = kafka_io.make_producer(bs, cfg.kafka.client)
        consumer = kafka_io.make_consumer(bs, _GROUP, cfg.kafka.client)
        topic = self.input_topic()
        consumer.assign([tp for tp in kafka_io.topic_partitions([topic], cfg.topics.partitions, self.offsets)
                         if tp.partition in self.partitions])
        self._stats = Throughput()
        log.info("rank %d/%d training on %s partitions %s, batch %d of %d, checkpoints in %s", self.rank, self.world,
                 topic, self.partitions, self.local_batch, tc.batch_size, self.ckpt_dir)
        start_n = self.global_trained
        last_msg = self._last_stats = self._last_log = time.monotonic()
        flags = torch.zeros(len(_FLAGS), dtype=torch.long)
        try:
            while True:
                throttled = self._throttled()
                msgs = [] if (throttled or self._stop) else consumer.consume(num_messages=self.local_batch,
                                                                               timeout=0.2)
                now = time.monotonic()
                if msgs or throttled:
                    last_msg = now
                good, src = self.decode(msgs)
                flags[:] = torch.tensor([len(good), int(self._stop),
                                         int(now - self._last_ckpt_t >= tc.checkpoint_every_s and self._dirty()),
                                         int(idle_exit_s is not None and now - last_msg >= idle_exit_s)])
                dist.all_reduce(flags)
                total, stop, due, idle = (int(x) for x in flags)
                if total:
                    t0 = time.monotonic()
                    self.step(good, src, total)
                    self._pace(t0, len(good))
                self.producer.poll(0)
                if self.global_trained - self._last_ckpt_n >= tc.checkpoint_every_examples or due:
                    self.checkpoint()
                self._periodic(now)
                if stop:
                    log.info("rank %d: stopping (a rank was asked to)", self.rank)
                    break
                if max_examples is not None and self.global_trained - start_n >= max_examples:
                    log.info("trained %d examples on all ranks (--max-examples); stopping", self.global_trained - start_n)
                    break
                if idle == self.world:
                    log.info("no examples on any rank for %.1fs (--idle-exit); stopping", idle_exit_s)
                    break
            self.checkpoint()
            self._publish_stats()
            self._log_progress()
        finally:
            consumer.close()
            kafka_io.flush_all(self.producer, "trainer", log)
        return dict(self.counters)
