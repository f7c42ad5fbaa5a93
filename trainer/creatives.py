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
from collections import deque

import numpy as np

from streams import schema
from streams.bus.feed import TopicFeed

log = logging.getLogger("streamrec.creatives")

STEP = "semantic_ids.creatives"  # DeadLetter.step of refused AdCreative records
MAX_INBOX = 1_000_000  # creatives decoded but not yet applied; past it the consumer waits


class AdCreativeFeed:
    """A daemon thread decoding ``cfg.topics.ads`` into an inbox; :meth:`apply` moves the inbox into a
    :class:`~embedding_store.semantic_ids.SemanticIds` (in the caller's thread). ``stats()``: counters."""

    def __init__(self, cfg, poll_s: float = 0.2):
        self.cfg = cfg
        self._inbox: deque[schema.AdCreative] = deque()
        self._feed = TopicFeed(cfg, cfg.topics.ads, lambda raw, _now: self.offer(raw), group="streamrec-creatives",
                               step=STEP, name="creatives", poll_s=poll_s,
                               ready=lambda: len(self._inbox) < MAX_INBOX)  # full: the trainer has not applied them
        self.counts = {"creatives_read": 0, "creatives_refused": 0, "creatives_applied": 0}

    @classmethod
    def for_trainer(cls, cfg, learner) -> "AdCreativeFeed | None":
        """A feed when the learner reads semantic IDs and a broker is configured, else None."""
        if getattr(learner, "semantic_ids", None) is None or not cfg.kafka.bootstrap_servers:
            return None
        return cls(cfg)

    @property
    def error(self) -> BaseException | None:
        """What stopped the consumer thread, if anything did (the trainer goes on hashing raw ad ids)."""
        return self._feed.error

    def start(self) -> "AdCreativeFeed":
        """Start the consumer thread (again: no-op)."""
        self._feed.start()
        return self

    def close(self) -> None:
        self._feed.stop()

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
