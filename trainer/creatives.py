"""The live path of semantic IDs: ads' creatives from ``topics.ads`` into the trainer's codebook.

The generator (``GeneratorConfig.emit_creatives``, ``streamrec generate --creatives``) or an ad server writes one
:class:`~streams.schema.AdCreative` per ad at its birth to ``topics.ads``. A trainer whose
``trainer.ad_id_features`` reads semantic IDs runs an :class:`AdCreativeFeed`::

    topics.ads --consumer thread (decode, check)--> inbox --Trainer.process (its own thread)--> SemanticIds.add
                     \\--> dead letters (step semantic_ids.creatives): undecodable, NaN, wrong width

The consumer only decodes; the codebook is changed in the training thread between batches (:meth:`apply`), so
featurize never sees it half-updated and no lock is held while k-means runs. An ad's impressions that arrive
before its creative is applied score with its hashed raw id (the features' fallback), counted as
``semantic_ids.unknown_lookups``.

Restart: the consumer reads the topic from the beginning (no consumer group); ads the checkpoint already codes
keep their codes (:meth:`SemanticIds.add` ignores known ids), so a restarted trainer only codes the ads born
since. The topic's retention must cover the catalogue's lifetime (or be compacted by ad id).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import numpy as np

from streams import schema

log = logging.getLogger("streamrec.creatives")

STEP = "semantic_ids.creatives"  # DeadLetter.step of refused AdCreative records
MAX_INBOX = 1_000_000  # creatives decoded but not yet applied; past it the consumer waits


class AdCreativeFeed:
    """A daemon thread decoding ``cfg.topics.ads`` into an inbox; :meth:`apply` moves the inbox into a
    :class:`~embedding_store.semantic_ids.SemanticIds` (in the caller's thread). ``stats()``: counters."""

    def __init__(self, cfg, poll_s: float = 0.2):
        self.cfg, self.poll_s = cfg, poll_s
        self._inbox: deque[schema.AdCreative] = deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="creatives-consumer", daemon=True)
        self.error: BaseException | None = None
        self.counts = {"creatives_read": 0, "creatives_refused": 0, "creatives_applied": 0}

    @classmethod
    def for_trainer(cls, cfg, learner) -> "AdCreativeFeed | None":
        """A feed when the learner reads semantic IDs and a broker is configured, else None."""
        if getattr(learner, "semantic_ids", None) is None or not cfg.kafka.bootstrap_servers:
            return None
        return cls(cfg)

    def start(self) -> "AdCreativeFeed":
        """Start the consumer thread (again: no-op)."""
        if self._thread.ident is None:
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def offer(self, raw: bytes) -> str | None:
        """Decode one message into the inbox; the dead-letter reason when it is refused."""
        ev = schema.decode(raw, schema.AdCreative)
        if isinstance(ev, schema.Invalid):
            self.counts["creatives_refused"] += 1
            return ev.reason
        self._inbox.append(ev)
        self.counts["creatives_read"] += 1
        return None

    def apply(self, sids) -> int:
        """Code every creative waiting (at most one content width: a record of another width than the codebook's
        is counted refused); returns how many ads were handed to ``sids``."""
        if not self._inbox or sids is None:
            return 0
        batch: list[schema.AdCreative] = []
        while self._inbox:
            batch.append(self._inbox.popleft())
        dim = sids.dim if sids.dim is not None else len(batch[0].content)
        ok = [c for c in batch if len(c.content) == dim]
        if len(ok) < len(batch):
            self.counts["creatives_refused"] += len(batch) - len(ok)
            log.warning("semantic ids: %d creatives with content of another width than %d refused",
                        len(batch) - len(ok), dim)
        if ok:
            sids.add(np.fromiter((c.ad_id for c in ok), np.int64, len(ok)),
                     np.asarray([c.content for c in ok], dtype=np.float32))
        self.counts["creatives_applied"] += len(ok)
        return len(ok)

    def stats(self, sids=None) -> dict[str, float]:
        out = {k: float(v) for k, v in self.counts.items()}
        if sids is not None:
            out.update({"semantic_ids_ads": float(len(sids)), "semantic_ids_version": float(sids.version),
                        **{f"semantic_ids_{k}": float(v) for k, v in sids.stats.items()}})
        return out

    def _run(self) -> None:
        from streams.bus import kafka_io

        cfg = self.cfg
        bs = cfg.kafka.bootstrap_servers
        try:
            consumer = kafka_io.make_consumer(bs, "streamrec-creatives", cfg.kafka.client)
            producer = kafka_io.make_producer(bs, cfg.kafka.client)
        except BaseException as e:  # noqa: BLE001 - the trainer goes on hashing raw ad ids
            log.exception("creatives consumer could not start")
            self.error = e
            return
        try:
            consumer.assign(kafka_io.topic_partitions([cfg.topics.ads], cfg.topics.partitions))
            while not self._stop.is_set():
                if len(self._inbox) >= MAX_INBOX:  # the trainer has not applied them yet
                    time.sleep(self.poll_s)
                    continue
                for m in consumer.consume(num_messages=500, timeout=self.poll_s):
                    err = m.error()
                    if err is not None:
                        kafka_io.consumer_error(err, "creatives consumer", log)
                        continue
                    reason = self.offer(m.value() or b"")
                    if reason is not None:
                        dl = schema.dead_letter(reason, m.value() or b"", topic=m.topic(), partition=m.partition(),
                                                offset=m.offset(), ts=int(time.time() * 1000), step=STEP)
                        kafka_io.produce(producer, cfg.topics.dead_letters, schema.encode(dl))
                producer.poll(0)
        except BaseException as e:  # noqa: BLE001 - logged; the trainer keeps training
            log.exception("creatives consumer stopped")
            self.error = e
        finally:
            consumer.close()
            kafka_io.flush_all(producer, "creatives dead letters", log)
