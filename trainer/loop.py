"""The continuous training loop: examples topic -> progressive validation -> train -> checkpoint.

Per micro-batch (:meth:`Trainer.process`): consume up to ``batch_size`` messages (``assign()`` at the
checkpointed offsets, no consumer group), decode (bad ones -> dead letters), drop already-trained example
ids, score the batch with the current model and publish a :class:`~streams.schema.PredictionBatch`, then
train on it; the user model learns from the batch after the ranker did (its own thread).

Exactly-once effect on the weights: the checkpoint stores weights, optimizer states, the dedup window and
the next offset of every partition together, atomically. After a crash ``--resume`` restarts from that
consistent point: messages after it are re-read and trained once (their predictions and dead letters are
published again: at-least-once there, keyed by example id for idempotent sinks).

Arms (``serving.arms``, docs/arms.md): the trainer is one arm's (``trainer.arm``; see
:func:`config.arm_trainer_config`) and its predictions carry it, with each example's serving arm and version.
``trainer.learn_from = "own"``: examples another arm served (``Impression.arm`` set and not this arm) are
scored and published like the others (so every arm's model is evaluated offline on the same examples) but not
trained on, nor fed to the user model; they are counted as ``examples_other_arm``. Logged traffic
(``Impression.arm`` empty: nobody's arm) is not any arm's own either, so an ``own`` trainer skips it too.

Publishing for serving (``trainer.publish_dir``): every ``publish_every_s`` seconds, when the model trained
since the last version, and at shutdown, a new model version (a delta or a full snapshot,
:mod:`trainer.publish`), written between batches; independent of the checkpoints (a version is never needed
to resume, and a failed publish is logged and retried at the next interval without stopping training).

Early stage (``trainer.early_stage``, :mod:`trainer.early_stage`): after each step of this model, the light
early-stage ranker learns from the same batch (labels and this model's scores before its update, and this
model's scores of candidate pairs); it is checkpointed with the model (exactly-once alike) and published with
every model version, for the serving cascade (``serving.cascade_k``).

Roles (``trainer.role``, docs/transfer.md). A ``ranker`` trains on ``topics.examples`` as above. An ``fm``
(the foundation model, the teacher) does too, and also publishes the scores it makes before each update (the
same ones as its predictions) to ``topics.teacher_predictions``: one :class:`~streams.schema.TeacherBatch` per
examples-topic partition of the micro-batch, to that SAME partition number, so the teacher join
(``streams/flows/distill.py``) finds an example and its teacher in one partition's state. A ``vm`` (a vertical
student) trains on ``topics.examples_distilled``, the examples with the teacher attached, and with
``trainer.vm_domains`` set only on examples of those domains (the others are skipped, counted as
``examples_other_domain``); offsets, checkpoints and the dedup by example id are the same, so a VM trains each
example once whatever the join re-emits after a crash, and a teacher is never applied twice.

The process around it (command line, signals, malloc settings) is ``trainer/service.py``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path

import msgspec
import numpy as np
import torch

from config import Config
from embedding_store.users import index_path
from streams import schema
from streams.bus import kafka_io
from streams.names import Stat, Step
from trainer import checkpoint
from trainer.early_stage import EarlyStage
from trainer.export import export
from trainer.features import featurize
from trainer.loopfm import LoopFM
from trainer.creatives import AdCreativeFeed
from trainer.solaris import Solaris
from trainer.model import Learner
from trainer.roles import serves
from trainer.publish import Publisher
from trainer.telemetry import Throughput, service_stats
from trainer.users.features import user_worker
from trainer.users.service import write_index_file

log = logging.getLogger("streamrec.trainer")
DEDUP_CAPACITY = 2_000_000  # example ids remembered (oldest forgotten first)
STATS_EVERY_S = 1.0
LOG_EVERY_S = 10.0
_GROUP = "streamrec-trainer"  # required by librdkafka; never joined (assign() only, no commits)


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


class Trainer:
    """The continuous trainer of one process. ``run()`` until stopped, idle, or ``max_examples`` trained."""

    def __init__(self, cfg: Config, *, resume: bool, record_ids: bool = False, export_dir: str | None = None,
                 publish_dir: str | None = None):
        self.cfg, self.tc = cfg, cfg.trainer
        self.export_dir = export_dir or cfg.trainer.export_dir
        self.publish_dir = publish_dir or cfg.trainer.publish_dir
        self.ckpt_dir = Path(self.tc.checkpoint_dir)
        checkpoint.check_world(self.ckpt_dir, getattr(self, "world", 1))  # several ranks: trainer/distributed.py
        found = checkpoint.latest(self.ckpt_dir)
        if found and not resume:
            raise checkpoint.CheckpointError(
                f"checkpoint {found} exists: pass --resume to continue from it, or --fresh to delete it and "
                "start over")
        self.learner = Learner(self.tc, elapsed_s=cfg.labels.elapsed_s)
        self.users = user_worker(cfg) if self.tc.user_model else None
        if self.users is not None:
            self.learner.user_view = self.users.view
        # FM: publishes its user/ad vectors; loopfm on: reads them (learner.loopfm_view); trainer/loopfm.py
        self.loopfm = LoopFM.for_trainer(cfg, self.learner)
        # the multi-task early-stage ranker (trainer/early_stage.py), trained beside this model on the same
        # batches; on the learner so that trainer/publish.py publishes it with every version
        self.early = EarlyStage(self.tc, device=self.learner.device) if self.tc.early_stage else None
        self.learner.early_stage = self.early
        # semantic IDs (trainer.ad_id_features): ads' creatives from topics.ads, coded between batches
        self.creatives = AdCreativeFeed.for_trainer(cfg, self.learner)
        # SOLARIS: the precompute service's FM pair predictions in a cache (learner.solaris_view); trainer/solaris.py
        self.solaris = Solaris.for_trainer(cfg, self.learner)
        self.offsets: dict[tuple[str, int], int] = {}
        # plain str keys (a Stat indexes them alike): checkpoints load with torch's weights_only unpickler
        self.counters = {k.value: 0 for k in (Stat.EXAMPLES_TRAINED, Stat.STEPS, Stat.DUPLICATES, Stat.DEAD_LETTERS,
                                              Stat.CHECKPOINTS, Stat.EXAMPLES_OTHER_ARM)}
        if self.tc.role == "fm":
            self.counters[Stat.TEACHERS_PUBLISHED.value] = 0
        if self.tc.role == "vm" and self.tc.vm_domains:
            self.counters[Stat.EXAMPLES_OTHER_DOMAIN.value] = 0
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
        self.publisher = Publisher.for_trainer(self.publish_dir, self.tc) if self.publish_dir else None
        self._last_pub_t = time.monotonic()
        self._published_steps = -1  # learner.steps of the newest version (-1: none yet)
        self._last_step_ms = 0  # wall ms of the newest training step (a version's trained_ts)

    # ---- state ---------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"learner": self.learner.state(),
                "offsets": [[t, p, o] for (t, p), o in sorted(self.offsets.items())],
                "counters": dict(self.counters), "dedup": self.dedup.ids(),
                "trained_ids": None if self.trained_ids is None else list(self.trained_ids),
                "newest_event_ts": self.newest_event_ts,
                **({"users": self.users.state()} if self.users is not None else {}),
                **({"early_stage": self.early.state()} if self.early is not None else {}),
                "config": msgspec.to_builtins(self.cfg), "written_ts": int(time.time() * 1000)}

    def restore(self, st: dict) -> None:
        self.learner.load_state(st["learner"])
        self.offsets = {(t, int(p)): int(o) for t, p, o in st["offsets"]}
        self.counters.update(st["counters"])
        self.dedup = Dedup(DEDUP_CAPACITY, st["dedup"])
        if st.get("trained_ids") is not None:
            self.trained_ids = list(st["trained_ids"])
        self.newest_event_ts = int(st.get("newest_event_ts", 0))
        if self.early is not None and "early_stage" in st:  # a checkpoint from before: a fresh early stage
            self.early.load_state(st["early_stage"])
        if self.users is not None and "users" in st:
            self.users.load_state(st["users"])
            self.learner.user_view = self.users.view  # the live table, not the checkpoint's frozen copy

    def checkpoint(self) -> Path:
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
            write_index_file(st["users"], index_path(self.cfg))
        if self.export_dir:  # serving artifacts follow the checkpoints
            export(self.learner, self.export_dir, examples_trained=self.counters["examples_trained"],
                   keep=self.tc.export_keep)
        return path

    def publish(self) -> None:
        """Write the next model version for serving (trainer/publish.py); a failure is logged, not raised."""
        self._last_pub_t = time.monotonic()
        try:
            info = self.publisher.publish(self.learner, examples_trained=self.counters["examples_trained"],
                                          trained_ts=self._last_step_ms or None)
        except Exception:  # noqa: BLE001 - e.g. a full disk: serving keeps the previous version; training goes on
            log.exception("publishing a model version to %s failed; retrying at the next interval", self.publish_dir)
            return
        self._published_steps = self.learner.steps
        log.debug("published model version %d (%s, %d bytes, %d steps)", info.seq, info.kind, info.bytes, info.steps)

    def _publish_due(self, now: float) -> bool:
        return (self.publisher is not None and self.learner.steps != self._published_steps
                and now - self._last_pub_t >= self.tc.publish_every_s)

    # ---- one batch -----------------------------------------------------------------------------
    def process(self, msgs: list) -> int:
        """Decode, dedup, score+publish, train; returns how many examples were trained."""
        return self.train_examples(*self.decode(msgs))

    def decode(self, msgs: list) -> tuple[list[schema.Example], dict[str, int]]:
        """The batch's new examples (bad ones dead-lettered, trained ones dropped), each id's partition."""
        now_ms = int(time.time() * 1000)
        good: list[schema.Example] = []
        src: dict[str, int] = {}  # example id -> its partition (an FM's teacher batches go to that number)
        for m in msgs:
            err = m.error()
            if err is not None:
                kafka_io.consumer_error(err, "trainer consumer", log)
                continue
            self.offsets[(m.topic(), m.partition())] = m.offset() + 1
            ex = schema.decode(m.value() or b"", schema.Example)
            if isinstance(ex, schema.Invalid):
                self._dead_letter(ex.reason, m, now_ms)
            elif not serves(self.tc, ex.impression.domain):
                self.counters[Stat.EXAMPLES_OTHER_DOMAIN] += 1  # another VM's domain: neither trained nor deduped
            elif self.dedup.add(ex.example_id):
                good.append(ex)
                src[ex.example_id] = m.partition()
            else:
                self.counters["duplicates"] += 1
        return good, src

    def train_examples(self, good: list[schema.Example], src: dict[str, int]) -> int:
        """Score+publish, train on ``good`` (from :meth:`decode`); returns how many examples were trained."""
        if self.tc.learn_from == "own":  # another arm's traffic: scored and published, not trained on
            other = [ex for ex in good if ex.impression.arm != self.tc.arm]
            if other:
                good = [ex for ex in good if ex.impression.arm == self.tc.arm]
                self.counters[Stat.EXAMPLES_OTHER_ARM] += len(other)
                ofb = featurize(other, self.tc, self.learner.user_view, self.learner.loopfm_view,
                                sids=self.learner.semantic_ids, cohorts=self.learner.cohorts,
                                solaris=self.learner.solaris_view)
                self._publish_predictions(ofb, other, *self.learner.score(ofb), src)
        if not good:
            return 0
        if self.creatives is not None:  # the ads born since the last batch get their codes before it is featurized
            self.creatives.apply(self.learner.semantic_ids)
        fb = featurize(good, self.tc, self.learner.user_view, self.learner.loopfm_view,
                       sids=self.learner.semantic_ids, cohorts=self.learner.cohorts,
                       solaris=self.learner.solaris_view)
        res = self.learner.train_step(fb, before_update=lambda p_click, p_conv: self._publish_predictions(
            fb, good, p_click, p_conv, src))
        if self.early is not None:  # the early stage learns the final's pre-update scores of this batch
            self.early.step_beside(self.learner, fb, [ex.impression for ex in good], res.p_click, res.p_conversion)
        self._last_step_ms = int(time.time() * 1000)
        self.counters["steps"] = self.learner.steps
        self.counters["examples_trained"] += len(good)
        if self.trained_ids is not None:
            self.trained_ids.extend(fb.example_ids)
        self.newest_event_ts = max(self.newest_event_ts, int(fb.event_ts.max()))
        if self.users is not None:  # the user model learns from the batch after the ranker did
            self.users.submit(good)
        if self.loopfm is not None:  # an FM: the batch's users and ads as it sees them after the update
            self.loopfm.after_step([ex.impression for ex in good])
        self._stats.add(fb.event_ts, int(time.time() * 1000), fb.emitted_ts)
        return len(good)

    def _publish_predictions(self, fb, examples: list[schema.Example], p_click: np.ndarray,
                             p_conv: np.ndarray, src: dict[str, int] | None = None) -> None:
        """The batch's scores (before any update from it), with this trainer's arm and each example's serving
        arm and version (all empty for logged traffic); an FM's also as teacher predictions."""
        served = any(ex.impression.arm for ex in examples)
        pb = schema.PredictionBatch(
            model_version=self.learner.steps, trained_ts=int(time.time() * 1000), example_ids=fb.example_ids,
            domains=fb.domains, event_ts=fb.event_ts.tolist(), emitted_ts=fb.emitted_ts.tolist(),
            p_click=p_click.tolist(), p_conversion=p_conv.tolist(), click=fb.click.astype(int).tolist(),
            conversion=fb.conversion.astype(int).tolist(), arm=self.tc.arm,
            served_arms=[ex.impression.arm for ex in examples] if served else [],
            served_versions=[ex.impression.model_version for ex in examples] if served else [],
            cohorts=fb.cohort or [])
        kafka_io.produce(self.producer, self.cfg.topics.predictions, schema.encode(pb))
        if self.tc.role == "fm" and src is not None:
            self._publish_teachers(fb.example_ids, p_click, p_conv, src, pb.trained_ts)

    def _publish_teachers(self, ids: list[str], p_click: np.ndarray, p_conv: np.ndarray, src: dict[str, int],
                          scored_ts: int) -> None:
        """One TeacherBatch per source partition, to that partition number of topics.teacher_predictions (key
        ``p<n>``): the teacher join runs one state per partition number (streams/flows/distill.py)."""
        by_part: dict[int, list[int]] = {}
        for i, eid in enumerate(ids):
            by_part.setdefault(src[eid], []).append(i)
        pc, pv = np.asarray(p_click, dtype=np.float64), np.asarray(p_conv, dtype=np.float64)
        n = self.cfg.topics.partitions
        for p, rows in sorted(by_part.items()):
            tb = schema.TeacherBatch(model_version=self.learner.steps, scored_ts=scored_ts,
                                     example_ids=[ids[i] for i in rows], p_click=pc[rows].tolist(),
                                     p_conversion=pv[rows].tolist())
            kafka_io.produce(self.producer, self.cfg.topics.teacher_predictions, schema.encode(tb),
                             key=f"p{p}".encode(), partition=p % n)
        self.counters[Stat.TEACHERS_PUBLISHED] += len(ids)

    def _dead_letter(self, reason: str, m, now_ms: int) -> None:
        self.counters["dead_letters"] += 1
        dl = schema.dead_letter(reason, m.value() or b"", topic=m.topic(), partition=m.partition(),
                                offset=m.offset(), ts=now_ms, step=Step.TRAINER_DECODE)
        kafka_io.produce(self.producer, self.cfg.topics.dead_letters, schema.encode(dl))

    def _publish_stats(self) -> None:
        st = service_stats(self, self._stats)
        kafka_io.produce(self.producer, self.cfg.topics.service_stats, schema.encode(st))

    # ---- loop ----------------------------------------------------------------------------------
    def input_topic(self) -> str:
        """What this trainer reads: a VM the distilled examples (with their teachers), others the examples."""
        return self.cfg.topics.examples_distilled if self.tc.role == "vm" else self.cfg.topics.examples

    def stop(self, *_args) -> None:
        """Finish the current batch, checkpoint and return from :meth:`run` (signal-safe)."""
        self._stop = True

    def run(self, max_examples: int | None = None, idle_exit_s: float | None = None) -> dict[str, int]:
        cfg, tc = self.cfg, self.tc
        bs = cfg.kafka.bootstrap_servers
        self.producer = kafka_io.make_producer(bs, cfg.kafka.client)
        consumer = kafka_io.make_consumer(bs, _GROUP, cfg.kafka.client)
        topic = self.input_topic()
        consumer.assign(kafka_io.topic_partitions([topic], cfg.topics.partitions, self.offsets))
        if self.loopfm is not None:
            self.loopfm.start(self.producer)
        if self.creatives is not None:
            self.creatives.start()
        if self.solaris is not None:
            self.solaris.start()
        self._stats = Throughput()
        log.info("training on %s (%d partitions, role %s), backend=%s device=%s batch=%d, checkpoints in %s",
                 topic, cfg.topics.partitions, tc.role, self.learner.backend, self.learner.device,
                 tc.batch_size, self.ckpt_dir)
        start_n = self.counters["examples_trained"]
        last_msg = self._last_stats = self._last_log = time.monotonic()
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
                if self.loopfm is not None:
                    self.loopfm.tick()
                done = self.counters["examples_trained"] - start_n
                if (self.counters["examples_trained"] - self._last_ckpt_n >= tc.checkpoint_every_examples
                        or (now - self._last_ckpt_t >= tc.checkpoint_every_s and self._dirty())):
                    self.checkpoint()
                if self._publish_due(now):
                    self.publish()
                self._periodic(now)
                if max_examples is not None and done >= max_examples:
                    log.info("trained %d examples (--max-examples); stopping", done)
                    break
                if idle_exit_s is not None and now - last_msg >= idle_exit_s:
                    log.info("no examples for %.1fs (--idle-exit); stopping", idle_exit_s)
                    break
            if self.loopfm is not None:
                self.loopfm.tick(force=True)
            self.checkpoint()
            if self._publish_due(float("inf")):  # the last steps reach serving too
                self.publish()
            self._publish_stats()
            self._log_progress()
        finally:
            consumer.close()
            kafka_io.flush_all(self.producer, "trainer", log)
            if self.users is not None:
                self.users.close()
            if self.loopfm is not None:
                self.loopfm.close()
            if self.creatives is not None:
                self.creatives.close()
            if self.solaris is not None:
                self.solaris.close()
            torch.set_num_threads(threads)  # the process's setting again (in-process callers: tests, benchmarks)
        return dict(self.counters)

    def _periodic(self, now: float) -> None:
        """The loop's periodic tail (this loop's and trainer/distributed.py's): service statistics every
        :data:`STATS_EVERY_S`, a progress line every :data:`LOG_EVERY_S` (``now``: time.monotonic(); the clocks
        start where :meth:`run` sets ``_last_stats`` and ``_last_log``)."""
        if now - self._last_stats >= STATS_EVERY_S:
            self._publish_stats()
            self._last_stats = now
        if now - self._last_log >= LOG_EVERY_S:
            self._log_progress()
            self._last_log = now

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
