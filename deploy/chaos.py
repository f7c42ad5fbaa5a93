"""``streamrec chaos``: SIGKILL every process of a running stack in turn under a sustained stream, then prove
that nothing was lost and nothing applied twice.

A fresh durable stack (:class:`deploy.stack.LocalStack`) runs with the ranking service (``serve=True``: the
trainer publishes a model version every 2 s, ``streamrec serve`` ranks with the newest). It gets a generated
log produced at a steady rate (good events plus malformed ones) and, beside it, a small steady stream of
ranking requests (:class:`_Requests`, 20/s, :data:`SERVED_PREFIX` request ids, candidates from the log's ads;
each answered ad is an impression the service put on the impressions topic). Meanwhile each process is killed
with SIGKILL in turn (:data:`KILL_ORDER`: labels and stats dataflows, trainer with its user-model thread, the
ranking service, storage, dashboard with the metrics sink, broker) and the supervisor brings it back. The
service is killed only once it has answered a request (so a model version was published and served), and the
run goes on until the restarted service answered again. Once the log's end is through, the run waits for the
stack to settle and checks, from what the processes left behind rather than from their counters:

* **labelled**: distinct example ids of the log on the examples topic, and their labels against the log's own
  feedback;
* **trained**: the ids in the trainer's final checkpoint (kept with ``--record-trained-ids``): the examples
  whose updates the saved weights hold; an id listed twice was applied twice;
* **stored**: prediction rows in ClickHouse of the log's examples (one per example and objective);
* **dead letters**: stored dead letters, which must be exactly the malformed records produced (a served
  impression refused by the labels join would show up here too);
* **served**: the impressions topic, read through the restarted broker, holds every impression of every
  answered request (``serving.ack_impressions``: the service answers once the broker acknowledged them).

``lost`` is the log's examples missing from the checkpoint, ``doubled`` ids (the log's or served) applied more
than once, ``served_lost`` impressions of answered requests missing from the topic; all must be 0. The counts
above are the log's alone, so they stay exact whatever the served traffic: served impressions are labelled
only if they reach the topic before the log's end-of-log mark (it closes their windows too), and their ids
(the request id, then ``.position``) never collide with the log's. A request the service could not answer
(it was down, had no model yet, or died mid-request) is counted in ``requests_failed`` and makes no claim.
The verdict never depends on when a kill lands: the run waits for completion, however long recovery takes,
up to a timeout that fails the run.

``--with-fm`` runs the foundation-model stack instead (``streamrec up --with-fm``, no ranking service: the two do
not combine yet): the FM, one vertical model per :data:`FM_VM_GROUPS` entry and the teacher-join flow, killed in
turn with the rest (:data:`FM_KILL_ORDER`). Every model is checked on its own: the FM must hold every example of
the log once, each VM every example of its domains once (``models`` in the result: trained, lost, doubled per
model; ``lost`` and ``doubled`` are their sums), and the store one row per model, example and objective.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from deploy.stack import LocalStack, StatsWatcher
from serving.client import Client
from deploy.up import generated_log, stored_predictions
from streams import schema
from streams.bus import kafka_io
from streams.bus.processes import free_port
from config import Config, replace
from streams.sources.logfile import BadRecord
from streams.sources.scenarios import ScenarioConfig

log = logging.getLogger("streamrec.chaos")

# the order processes are killed in; the user-model worker is a thread of the trainer, the metrics sink a
# thread of the dashboard process: they die and come back with them. The ranking service is killed once it
# has answered (the trainer published a version and the service loaded it), then the trainer under it
# (the restarted service serves the versions already published, then the resumed trainer's), both before the
# storage and broker outages
KILL_ORDER = ("labels", "serve", "trainer", "storage", "dashboard", "stats", "broker")
# --with-fm: the vertical models' domain groups (covering the generator's domains), and the kill order: the FM
# first (the VMs go on without teachers, then with them again), then a VM while the FM runs
FM_VM_GROUPS = (("feed", "stories"), ("video", "search"))
FM_KILL_ORDER = ("labels", "trainer-fm", "distill", "trainer-vm-feed-stories", "storage", "dashboard", "stats",
                 "trainer-vm-video-search", "broker")
WHAT_DIES = {"trainer": "trainer + user-model thread", "dashboard": "dashboard + metrics sink",
             "serve": "ranking service", "trainer-fm": "foundation model (trainer + user-model thread)",
             "distill": "teacher-join dataflow", "trainer-vm-feed-stories": "vertical model feed+stories",
             "trainer-vm-video-search": "vertical model video+search"}
# request ids of the served traffic start with this (the generator's impression ids start with "imp-"), so a
# served impression's id f"{request_id}.{position}" tells it from the log's
SERVED_PREFIX = "chaos-"
REQUEST_RATE = 20.0  # ranking requests per second
REQUEST_CANDIDATES, REQUEST_K = 10, 3  # candidates per request, ads served per answer


@dataclass
class ChaosResult:
    impressions: int = 0
    bad_records: int = 0
    labelled: int = 0
    labelled_messages: int = 0
    wrong_labels: int = 0
    trained: int = 0
    lost: int = 0
    doubled: int = 0
    stored_rows: int = 0
    dead_letters: int = 0
    unexpected_dead: dict[str, int] = field(default_factory=dict)
    served_requests: int = 0  # ranking requests answered (200)
    served_impressions: int = 0  # the ads of those answers: impressions the topic must hold
    served_lost: int = 0  # of those, missing from the impressions topic
    served_trained: int = 0  # served impressions labelled and trained within the run (informative)
    requests_failed: int = 0  # requests not answered: service down, no model yet, died mid-request
    request_errors: dict[str, int] = field(default_factory=dict)  # why, by status or exception
    kills: list[tuple[str, float]] = field(default_factory=list)  # (process, seconds it took to come back)
    restarts: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    settled: bool = False
    # --with-fm: per model (arm): (examples it must hold, trained, lost, doubled)
    models: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)

    @property
    def with_fm(self) -> bool:
        return bool(self.models)

    @property
    def expected_rows(self) -> int:
        """Prediction rows the store must hold: per example and objective, once per model that trains it."""
        return 2 * (sum(m[0] for m in self.models.values()) if self.models else self.impressions)

    @property
    def ok(self) -> bool:
        served = self.with_fm or (self.served_requests > 0 and self.served_lost == 0)
        return (self.settled and self.lost == 0 and self.doubled == 0 and self.wrong_labels == 0
                and self.labelled == self.impressions and self.stored_rows == self.expected_rows
                and self.dead_letters == self.bad_records and not self.unexpected_dead and served)


class _Producer(threading.Thread):
    """Produces ``records`` at ``rate`` records per second, then the end-of-log mark."""

    def __init__(self, cfg: Config, records: list, rate: float):
        super().__init__(name="chaos-producer", daemon=True)
        self.cfg, self.records, self.rate = cfg, records, rate
        self.error: BaseException | None = None
        self.done = threading.Event()
        # the event time the log has reached (the newest ts sent): served impressions are stamped with it
        self.ts = next((r.ts for r in records if hasattr(r, "ts")), int(time.time() * 1000))

    def run(self) -> None:
        from streams.sources.replay import Publisher

        try:
            with Publisher(self.cfg, progress=False, desc="chaos") as pub:
                t0 = time.monotonic()
                for i, rec in enumerate(self.records):
                    pub.send(rec)
                    ts = getattr(rec, "ts", None)
                    if ts is not None and ts > self.ts:
                        self.ts = ts
                    if i % 256 == 255:
                        ahead = (i + 1) / self.rate - (time.monotonic() - t0)
                        if ahead > 0:
                            time.sleep(ahead)
                pub.finish(timeout_s=600)
        except BaseException as e:  # noqa: BLE001 - reported by the caller
            self.error = e
        finally:
            self.done.set()


class _Requests(threading.Thread):
    """Sends ranking requests to the service at ``rate`` per second until stopped, and remembers what it was
    answered.

    Each request: a user, domain and context of one of the log's impressions, :data:`REQUEST_CANDIDATES` of
    the log's ads as explicit candidates, ``k`` = :data:`REQUEST_K`, a request id unique per attempt
    (``f"{prefix}{i}"``, never retried under the same id) and ``ts`` = the event time the log's producer has
    reached (``event_ts()``): the log lies in the past, and an impression stamped with the wall clock would
    run the impressions topic far ahead of the clicks in event time, which makes the labels dataflow pause it
    (``labels.pace_slack_s``). Every answered ad is recorded as the impression id the service emitted for it
    (``f"{request_id}.{position}"``); a connection error, a timeout or an error status (503 while no model is
    loaded) counts as failed, and the next request goes on at the same rate.
    """

    def __init__(self, host: str, port: int, records: list, *, prefix: str, event_ts, rate: float = REQUEST_RATE,
                 seed: int = 0):
        super().__init__(name="chaos-requests", daemon=True)
        self.host, self.port, self.prefix, self.event_ts, self.rate = host, port, prefix, event_ts, rate
        self.imps = [r for r in records if isinstance(r, schema.Impression)]
        ads = {}
        for imp in self.imps:
            ads.setdefault(imp.ad_id, {"ad_id": imp.ad_id, "campaign_id": imp.campaign_id,
                                       "advertiser_id": imp.advertiser_id})
        self.ads = [ads[a] for a in sorted(ads)]
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.served: set[str] = set()  # impression ids of answered requests
        self.answered = 0
        self.failed = 0
        self.errors: Counter = Counter()
        self._stop_ev = threading.Event()

    def request(self, i: int) -> dict:
        imp = self.rng.choice(self.imps)
        return {"request_id": f"{self.prefix}{i}", "user_id": imp.user_id, "domain": imp.domain, "k": REQUEST_K,
                "context": {"device": imp.device, "country": imp.country, "dense": imp.dense, "cat": imp.cat,
                            "history": imp.history},
                "candidates": self.rng.sample(self.ads, min(REQUEST_CANDIDATES, len(self.ads))),
                "ts": int(self.event_ts())}

    def run(self) -> None:
        client = Client(self.host, self.port, timeout=10.0)
        t0, i = time.monotonic(), 0
        try:
            while not self._stop_ev.is_set():
                req = self.request(i)
                i += 1
                try:
                    status, res = client.rank(req)
                    why = None if status == 200 and res.get("request_id") == req["request_id"] else str(status)
                except (OSError, ValueError) as e:  # refused, reset, timed out (the service is down), bad body
                    client.close()
                    status, res, why = 0, None, type(e).__name__
                with self.lock:
                    if why is None:
                        self.answered += 1
                        self.served.update(f"{req['request_id']}.{ad['position']}" for ad in res["ads"])
                    else:
                        self.failed += 1
                        self.errors[why] += 1
                ahead = i / self.rate - (time.monotonic() - t0)
                if ahead > 0:
                    self._stop_ev.wait(ahead)
        finally:
            client.close()

    def wait_answered(self, n: int, timeout: float, what: str) -> None:
        """Wait until ``n`` requests were answered in all; RuntimeError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self.answered < n:
            if time.monotonic() >= deadline or not self.is_alive():
                raise RuntimeError(f"chaos: {what}: the ranking service answered {self.answered} of {n} requests "
                                   f"within {timeout:.0f}s ({self.failed} failed: {dict(self.errors)})")
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop_ev.set()
        self.join(timeout=30)


class _ExampleTail:
    """The distinct example ids on the examples topic so far, the log's and the served ones apart: what the
    trainer can have trained at most (it trains only what it read there), so the run knows when every example
    of the log was trained and stored however many served impressions were labelled too."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.consumer = kafka_io.make_consumer(cfg.kafka.bootstrap_servers, "chaos-settle", cfg.kafka.client)
        self.tps = kafka_io.topic_partitions([cfg.topics.examples], cfg.topics.partitions)
        self.consumer.assign(self.tps)
        self.log_ids: set[str] = set()
        self.served_ids: set[str] = set()

    def catch_up(self, timeout: float = 10.0) -> bool:
        """Read up to each partition's end as of now; False if that took longer than ``timeout``."""
        from confluent_kafka import KafkaException, TopicPartition

        try:
            ends = {tp.partition: self.consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition),
                                                                       timeout=5, cached=False)[1]
                    for tp in self.tps}
        except KafkaException:
            return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pos = {tp.partition: tp.offset for tp in self.consumer.position(self.tps)}
            if all(pos[p] >= end or end <= 0 for p, end in ends.items()):
                return True
            for m in self.consumer.consume(num_messages=10_000, timeout=0.2):
                if m.error() is None:
                    ex = schema.decode(m.value(), schema.Example)
                    if isinstance(ex, schema.Example):
                        (self.served_ids if ex.example_id.startswith(SERVED_PREFIX) else self.log_ids).add(
                            ex.example_id)
        return False

    def close(self) -> None:
        self.consumer.close()


def _kill(stack: LocalStack, name: str, timeout: float = 60.0) -> float:
    """SIGKILL process ``name``; returns the seconds until the supervisor had it running again."""
    child = stack.child(name)
    if not child.alive():
        return 0.0
    pid, t0 = child.proc.pid, time.monotonic()
    os.kill(pid, signal.SIGKILL)
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        if child.alive() and child.proc.pid != pid:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise RuntimeError(f"chaos: {name} did not come back within {timeout:.0f}s (see {child.log_path})")


def _expected_labels(records: list) -> dict[str, tuple[int, int]]:
    """(click, conversion) of each good impression from the log's own feedback."""
    out = {r.event_id: [0, 0] for r in records if isinstance(r, schema.Impression)}
    for r in records:
        if isinstance(r, schema.Click) and r.impression_id in out:
            out[r.impression_id][0] = 1
        elif isinstance(r, schema.Conversion) and r.impression_id in out:
            out[r.impression_id][1] = 1
    return {k: (c, v) for k, (c, v) in out.items()}


def _read_topics(cfg: Config, kinds: dict[str, type]) -> dict[str, list]:
    """Per topic of ``kinds`` (topic -> record type), every record of that type from the beginning to the end of
    each partition, read by one consumer (records of another type, e.g. watermarks and malformed records on an
    input topic, are skipped)."""
    consumer = kafka_io.make_consumer(cfg.kafka.bootstrap_servers, "chaos-check", cfg.kafka.client,
                                      **{"enable.partition.eof": True})
    consumer.assign(kafka_io.topic_partitions(list(kinds), cfg.topics.partitions))
    out: dict[str, list] = {t: [] for t in kinds}
    eof, deadline = set(), time.monotonic() + 120
    try:
        while len(eof) < len(kinds) * cfg.topics.partitions and time.monotonic() < deadline:
            for m in consumer.consume(num_messages=10_000, timeout=0.5):
                if m.error() is None:
                    kind = kinds[m.topic()]
                    rec = schema.decode(m.value(), kind)
                    if isinstance(rec, kind):
                        out[m.topic()].append(rec)
                elif m.error().code() == kafka_io.KafkaError._PARTITION_EOF:
                    eof.add((m.topic(), m.partition()))
    finally:
        consumer.close()
    return out


def _store_counts(cfg: Config) -> tuple[int, dict[str, int]]:
    """(prediction rows of the log's examples, dead letters by reason category) from the store, opened once
    the dashboard process has released it."""
    from dashboards.store import Store

    store = Store.open(cfg.clickhouse_url(), cfg.metrics.database, cluster=cfg.metrics.cluster)
    try:
        rows = store.query("SELECT count() FROM (SELECT example_id, objective FROM {db}.predictions FINAL "
                           f"WHERE NOT startsWith(example_id, '{SERVED_PREFIX}'))").rows
        dead = store.query("SELECT splitByChar(':', reason)[1] AS why, count() FROM {db}.dead_letters FINAL "
                           "GROUP BY why").rows
        return int(rows[0][0]), {str(k): int(v) for k, v in dead}
    finally:
        store.close()


def run_chaos(cfg: Config, data_dir: Path, *, events: int, rate: float, rounds: int = 1, bad_rate: float = 0.01,
              seed: int = 7, settle_timeout: float = 300.0, serve_timeout: float = 180.0, with_fm: bool = False,
              progress=print) -> ChaosResult:
    """One chaos run in a fresh durable stack under ``data_dir``; see the module docstring. ``serve_timeout``:
    how long the run waits for the ranking service to answer (before it is killed: the trainer's first version
    published and loaded; after: the restarted service), else RuntimeError. ``with_fm``: the foundation-model
    stack (FM, vertical models, teacher join) instead of the ranking service."""
    t_start = time.monotonic()
    cfg = replace(cfg, data_dir=str(data_dir), kafka={"bootstrap_servers": ""},
                  trainer={"checkpoint_every_s": 5.0, "publish_every_s": 2.0},
                  serving={"port": free_port(), "arms": [{"name": "main", "share": 1.0}]})
    if with_fm:  # a VM waits for its teacher at most 5 s: the run does not crawl while the FM is down
        cfg = replace(cfg, distill={"teacher_wait_s": 5.0})
    stack = LocalStack(cfg, data_dir / "runs" / "chaos", fresh=True, port=free_port(), serve=not with_fm,
                       with_fm=with_fm, vm_groups=FM_VM_GROUPS if with_fm else ((),),
                       trainer_args=("--record-trained-ids",), labels_args=("--epoch-s", "2"))
    res = ChaosResult()
    records = generated_log(events, seed, bad_rate, ScenarioConfig())
    res.impressions = sum(isinstance(r, schema.Impression) for r in records)
    res.bad_records = sum(isinstance(r, BadRecord) for r in records)
    if with_fm:
        res.models = {arm: (n, 0, 0, 0) for arm, n in _fm_expected(records).items()}
    requests: _Requests | None = None
    tail: _ExampleTail | None = None
    try:
        cfg = stack.start()
        watcher = StatsWatcher(cfg, expect_arms=stack.trainer_arms)
        producer = _Producer(cfg, records, rate)
        producer.start()
        if not with_fm:
            requests = _Requests(cfg.serving.host, cfg.serving.port, records, prefix=f"{SERVED_PREFIX}{seed}-",
                                 event_ts=lambda: producer.ts, seed=seed)
            requests.start()
        schedule = [name for _ in range(rounds) for name in (FM_KILL_ORDER if with_fm else KILL_ORDER)]
        interval = len(records) / rate / (len(schedule) + 1)
        answered_at_kill = 0  # requests answered when the service was last killed
        for name in schedule:  # spread over the production, then one after the other if recovery is slower
            time.sleep(interval)
            if name == "serve":  # kill a service that serves: it has answered (again, after the last kill)
                requests.wait_answered(answered_at_kill + 1, serve_timeout,
                                       f"before killing it (see {stack.child('serve').log_path})")
            took = _kill(stack, name)
            if name == "serve":  # the old process is gone: answers counted from now on are the new one's
                answered_at_kill = requests.answered
            res.kills.append((name, took))
            progress(f"killed {WHAT_DIES.get(name, name)}: back in {took:.1f}s")
        producer.done.wait()
        if producer.error is not None:
            raise RuntimeError(f"chaos: the producer failed: {producer.error}") from producer.error
        if requests is not None:
            requests.wait_answered(answered_at_kill + 1, serve_timeout,
                                   f"after its restart (see {stack.child('serve').log_path})")
            # the impressions of what it was answered are on the topic (or, answered while the broker was away, in
            # the service's memory until delivered); the settle below counts those that were labelled
            requests.stop()
            progress(f"log produced, the ranking service answered again after its restart "
                     f"({requests.answered} answered, {requests.failed} failed); settling")
        else:
            progress("log produced; settling")
        url = f"http://{cfg.dashboard.host}:{cfg.dashboard.port}/"
        tail = _ExampleTail(cfg)
        deadline = time.monotonic() + settle_timeout
        while time.monotonic() < deadline:  # settle: every example of the log trained and stored
            watcher.poll()  # the trainer's count first, the examples topic after: trained <= what the tail saw
            trained, stored = watcher.trained(), stored_predictions(url, 0)
            if tail.catch_up() and len(tail.log_ids) >= res.impressions:
                # the trainer trained at most the served examples the tail saw: the rest are the log's
                everything = res.impressions + len(tail.served_ids)
                rows = res.expected_rows if with_fm else 2 * everything
                if trained >= everything and stored >= rows:
                    res.settled = True
                    break
            time.sleep(0.5)
        time.sleep(3.0)  # dead letters and the last service stats reach the store
        watcher.close()
    finally:
        if requests is not None and requests.is_alive():
            requests.stop()
        if tail is not None:
            tail.close()
        stack.stop()
        res.restarts = {c.name: c.restarts for c in stack.sup.children} if stack.sup else {}
    # -- verify from what the processes left behind
    from trainer import checkpoint

    topics = _read_with_broker(stack, cfg, {cfg.topics.examples: schema.Example,
                                            cfg.topics.impressions: schema.Impression})
    examples, impressions = topics[cfg.topics.examples], topics[cfg.topics.impressions]
    expected = _expected_labels(records)
    res.labelled_messages = len(examples)
    labels = {e.example_id: (e.click, e.conversion) for e in examples}
    res.labelled = len(set(labels) & set(expected))
    res.wrong_labels = sum(labels.get(k) != v for k, v in expected.items() if k in labels)
    if with_fm:
        domain = {r.event_id: r.domain for r in records if isinstance(r, schema.Impression)}
        for arm, (n, _, _, _) in res.models.items():
            found = checkpoint.load_latest(stack.dirs["checkpoints"] / arm)
            counts = Counter(found[1]["trained_ids"] if found else [])
            mine = {k for k in expected if _fm_trains(arm, domain.get(k, ""))}
            res.models[arm] = (n, len(set(counts) & mine), len(mine - set(counts)),
                               sum(c - 1 for c in counts.values()))
        res.trained = res.models["fm"][1]  # the FM trains every example
        res.lost = sum(m[2] for m in res.models.values())
        res.doubled = sum(m[3] for m in res.models.values())
    else:
        found = checkpoint.load_latest(stack.dirs["checkpoints"])
        trained = list(found[1]["trained_ids"]) if found else []
        counts = Counter(trained)
        res.trained = len(set(counts) & set(expected))
        res.served_trained = sum(k.startswith(SERVED_PREFIX) for k in counts)
        res.doubled = sum(n - 1 for n in counts.values())  # any id, the log's or served, applied twice
        res.lost = len(set(expected) - set(counts))
    res.stored_rows, dead = _store_counts(cfg)
    res.dead_letters = sum(dead.values())
    res.unexpected_dead = {k: v for k, v in dead.items() if k not in ("unparseable", "schema", "invalid", "too large")}
    if requests is not None:
        on_topic = {imp.event_id for imp in impressions if imp.event_id.startswith(SERVED_PREFIX)}
        res.served_requests, res.served_impressions = requests.answered, len(requests.served)
        res.served_lost = len(requests.served - on_topic)
        res.requests_failed, res.request_errors = requests.failed, dict(requests.errors)
    res.elapsed_s = time.monotonic() - t_start
    return res


def _fm_arm(group: tuple[str, ...]) -> str:
    return "vm" if not group else "vm-" + "-".join(group)  # as deploy.stack.LocalStack._fm_configs names them


def _fm_trains(arm: str, domain: str) -> bool:
    """Whether model ``arm`` of a ``--with-fm`` run trains an example of ``domain``."""
    return arm == "fm" or any(_fm_arm(g) == arm and domain in g for g in FM_VM_GROUPS)


def _fm_expected(records: list) -> dict[str, int]:
    """Per model of a ``--with-fm`` run, the examples of the log it must train."""
    doms = [r.domain for r in records if isinstance(r, schema.Impression)]
    return {arm: sum(_fm_trains(arm, d) for d in doms) for arm in ("fm", *map(_fm_arm, FM_VM_GROUPS))}


def _read_with_broker(stack: LocalStack, cfg: Config, kinds: dict[str, type]) -> dict[str, list]:
    """:func:`_read_topics` through a broker started again on the stack's storage (the stack is stopped)."""
    from streams.bus.broker import EmbeddedBroker
    from streams.bus.storage import StorageServer

    with StorageServer(stack.dirs["topics"]) as s3:
        with EmbeddedBroker(storage_port=s3.port, cluster_id=stack.broker.cluster_id) as broker:
            bcfg = replace(cfg, kafka={"bootstrap_servers": broker.bootstrap_servers})
            return _read_topics(bcfg, kinds)


def model_table(results: list[ChaosResult]) -> tuple[tuple[str, ...], list[tuple]]:
    """``--with-fm``: one row per run and model."""
    header = ("run", "model", "examples", "trained", "lost", "doubled")
    rows = [(i + 1, arm, f"{n:,}", f"{t:,}", lost, dbl) for i, r in enumerate(results)
            for arm, (n, t, lost, dbl) in r.models.items()]
    return header, rows


def table(results: list[ChaosResult]) -> tuple[tuple[str, ...], list[tuple]]:
    header = ("run", "impressions", "labelled", "trained", "prediction rows", "dead letters", "lost", "doubled",
              "wrong labels", "requests answered", "served impressions", "served lost", "requests failed", "kills",
              "s")
    rows = [(i + 1, f"{r.impressions:,}", f"{r.labelled:,}", f"{r.trained:,}", f"{r.stored_rows:,}",
             f"{r.dead_letters:,} of {r.bad_records:,}", r.lost, r.doubled, r.wrong_labels, f"{r.served_requests:,}",
             f"{r.served_impressions:,}", r.served_lost, f"{r.requests_failed:,}", len(r.kills),
             f"{r.elapsed_s:.0f}") for i, r in enumerate(results)]
    return header, rows


def run(args: argparse.Namespace, cfg: Config) -> int:
    results = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="streamrec-chaos-") as tmp:
            d = Path(args.data_dir).resolve() / f"chaos-{i}" if args.data_dir else Path(tmp)
            r = run_chaos(cfg, d, events=args.events, rate=args.rate, rounds=args.rounds, seed=args.seed + i,
                          with_fm=args.with_fm, progress=lambda m: print(m, file=sys.stderr))
            results.append(r)
            verdict = "OK" if r.ok else "FAILED"
            print(f"run {i + 1}: {verdict}: lost {r.lost}, doubled {r.doubled}, wrong labels {r.wrong_labels}, "
                  f"served lost {r.served_lost} of {r.served_impressions} (requests failed: "
                  f"{r.request_errors or 0}), unexpected dead letters {r.unexpected_dead or 0}, settled {r.settled}",
                  file=sys.stderr)
    header, rows = table(results)
    _print_table(header, rows)
    if args.with_fm:
        print()
        _print_table(*model_table(results))
    return 0 if all(r.ok for r in results) else 1


def _print_table(header, rows) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chaos", help="SIGKILL each process of a running stack in turn; check nothing is lost",
                       description="Start a fresh durable stack with the ranking service (its trainer publishing "
                                   "a model version every 2 s), produce a generated log at a steady rate and send "
                                   f"{REQUEST_RATE:g} ranking requests/s, SIGKILL each process in turn "
                                   f"({', '.join(KILL_ORDER)}) and let the supervisor bring it back, then check "
                                   "from the topics, the trainer's checkpoint and the store that every example "
                                   "was labelled, trained exactly once and stored, that only the malformed "
                                   "records became dead letters, and that every impression of every answered "
                                   "ranking request is on the impressions topic. Exits 1 if not.")
    p.add_argument("--events", type=int, default=20_000, help="impressions in the log (default 20000)")
    p.add_argument("--rate", type=float, default=1_000.0, help="records produced per second (default 1000)")
    p.add_argument("--rounds", type=int, default=1, help="times each process is killed (default 1)")
    p.add_argument("--runs", type=int, default=1, help="chaos runs in a row, each in a fresh stack (default 1)")
    p.add_argument("--seed", type=int, default=7, help="generator seed of the first run")
    p.add_argument("--data-dir", default=None, help="keep each run's stack here (default: a temporary directory)")
    p.add_argument("--with-fm", action="store_true",
                   help="the foundation-model stack instead of the ranking service: the FM, a vertical model per "
                        f"domain group ({'; '.join('+'.join(g) for g in FM_VM_GROUPS)}) and the teacher join, "
                        f"killed in turn with the rest ({', '.join(FM_KILL_ORDER)}); every model must hold each "
                        "of its examples exactly once")
    p.set_defaults(func=run)
