"""A topic read into an in-memory store by a daemon thread: every partition from the beginning, no consumer
group (each reader keeps its own copy), each record applied with ``apply_raw(raw, now_ms) -> reason | None``
and a refused one sent to ``topics.dead_letters`` with its reason and ``step``. What LoopFM's FM-vector store
and SOLARIS's pair cache run in a vertical model's trainer (embedding_store/fm_embeddings.py,
trainer/solaris.py) and the semantic-ID creatives feed (trainer/creatives.py, which holds the reader back with
``ready`` while its inbox is full): a reader that fails is logged and remembered in ``error``; the trainer goes
on without what it would have read (its lookups count as misses)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from streams import schema

log = logging.getLogger("streamrec.feed")


class TopicFeed:
    """``start()`` (returns self; again: no-op), ``stop()`` (joins; idempotent); ``messages`` read, ``error``
    what stopped the thread, if anything did. ``ready()``, when given, is asked before each poll: False waits
    ``poll_s`` without reading (the store is full until its owner drains it)."""

    def __init__(self, cfg, topic: str, apply_raw: Callable[[bytes, int], str | None], *, group: str, step: str,
                 name: str, poll_s: float = 0.2, ready: Callable[[], bool] | None = None):
        self.cfg, self.topic, self.apply_raw, self.poll_s, self.ready = cfg, topic, apply_raw, poll_s, ready
        self.group, self.step, self.name = group, step, name
        self.messages = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{name}-consumer", daemon=True)

    def start(self):
        if self._thread.ident is None:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        from streams.bus import kafka_io

        cfg = self.cfg
        bs = cfg.kafka.bootstrap_servers
        try:
            consumer = kafka_io.make_consumer(bs, self.group, cfg.kafka.client)
            producer = kafka_io.make_producer(bs, cfg.kafka.client)
        except BaseException as e:  # noqa: BLE001 - the trainer goes on without what it would read (misses)
            log.exception("%s consumer could not start", self.name)
            self.error = e
            return
        try:
            consumer.assign(kafka_io.topic_partitions([self.topic], cfg.topics.partitions))
            while not self._stop.is_set():
                if self.ready is not None and not self.ready():
                    time.sleep(self.poll_s)
                    continue
                for m in consumer.consume(num_messages=500, timeout=self.poll_s):
                    err = m.error()
                    if err is not None:
                        kafka_io.consumer_error(err, f"{self.name} consumer", log)
                        continue
                    self.messages += 1
                    now_ms = int(time.time() * 1000)
                    reason = self.apply_raw(m.value() or b"", now_ms)
                    if reason is not None:
                        dl = schema.dead_letter(reason, m.value() or b"", topic=m.topic(), partition=m.partition(),
                                                offset=m.offset(), ts=now_ms, step=self.step)
                        kafka_io.produce(producer, cfg.topics.dead_letters, schema.encode(dl))
                producer.poll(0)
        except BaseException as e:  # noqa: BLE001 - logged; the trainer keeps training on what it has
            log.exception("%s consumer stopped", self.name)
            self.error = e
        finally:
            consumer.close()
            kafka_io.flush_all(producer, f"{self.name} dead letters", log)
