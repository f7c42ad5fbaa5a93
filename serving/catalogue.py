"""Candidates for requests that name none: the catalogue of live ads and an ANN index over their vectors.

:class:`Catalogue`: ad id -> (campaign, advertiser, domains it was shown on, last seen, times seen), fed by
:class:`CatalogueFeed` (a consumer thread reading the impressions topic from its beginning; the service's own
served impressions land there too) and optionally a JSON-lines file (``streamrec serve --catalogue FILE``,
one ``{"ad_id", "campaign_id", "advertiser_id", "domains": [...]}`` per line). It is bounded
(:data:`MAX_ADS`): the ads seen least recently leave first.

:class:`AdIndex`: a FAISS inner-product index (:mod:`embedding_store.ann_faiss`, exact) over the served
model's ``ad_id`` embedding rows of the catalogue's ads, queried with the user's ``user_id`` row (the
factorisation-machine shortcut of the ranker scores exactly these user x ad dot products, so the nearest
ads are those the model already leans towards). One per arm, rebuilt off the request path when the arm's model
version changes or the catalogue has grown; requests use the index they find. Retrieval keeps ads seen on the
request's domain and tops up with the domain's most frequent ads (also the whole answer while the index is
empty).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Iterable

import msgspec
import numpy as np

from streams import schema

log = logging.getLogger(__name__)

MAX_ADS = 200_000
POPULAR_EVERY_S = 5.0  # how often the per-domain most-frequent lists are recomputed
POPULAR_KEEP = 1000


@dataclass
class AdInfo:
    campaign_id: int
    advertiser_id: int
    domains: int  # bit i: seen on schema.DOMAINS[i]
    last_seen: int  # event ms
    seen: int


class CatalogueLine(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    ad_id: schema.Id
    campaign_id: schema.Id
    advertiser_id: schema.Id
    domains: list[str] = []


class Catalogue:
    """Live ads. Written by one feed thread (and the file loader), read by requests without a lock: reads
    are single dict lookups, and the per-domain popular lists are swapped in whole."""

    def __init__(self, max_ads: int = MAX_ADS):
        self.max_ads = max_ads
        self.ads: dict[int, AdInfo] = {}
        self.version = 0  # bumps when ads are added (the index rebuild watches it)
        self._popular: dict[str, list[int]] = {}
        self._popular_at = 0.0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.ads)

    def get(self, ad_id: int) -> AdInfo | None:
        return self.ads.get(ad_id)

    def add(self, ad_id: int, campaign_id: int, advertiser_id: int, domains: Iterable[str], ts: int = 0) -> None:
        bits = 0
        for d in domains:
            i = schema.DOMAIN_INDEX.get(d)
            if i is not None:
                bits |= 1 << i
        with self._lock:
            info = self.ads.get(ad_id)
            if info is None:
                self.ads[ad_id] = AdInfo(campaign_id, advertiser_id, bits, ts, 1)
                self.version += 1
                if len(self.ads) > self.max_ads:
                    self._evict()
            else:
                info.campaign_id, info.advertiser_id = campaign_id, advertiser_id
                info.domains |= bits
                info.last_seen = max(info.last_seen, ts)
                info.seen += 1

    def add_impressions(self, imps: Iterable[schema.Impression]) -> None:
        for i in imps:
            self.add(i.ad_id, i.campaign_id, i.advertiser_id, (i.domain,), i.ts)
        if time.monotonic() - self._popular_at > POPULAR_EVERY_S:
            self.refresh_popular()

    def _evict(self) -> None:
        keep = sorted(self.ads.items(), key=lambda kv: kv[1].last_seen)[len(self.ads) - int(self.max_ads * 0.9):]
        self.ads = dict(keep)

    def load_file(self, path) -> int:
        """Add the ads of a JSON-lines file; returns how many; a bad line raises ValueError naming it."""
        dec = msgspec.json.Decoder(CatalogueLine)
        n = 0
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    ad = dec.decode(line)
                except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
                    raise ValueError(f"{path}:{lineno}: {e}") from None
                unknown = [d for d in ad.domains if d not in schema.DOMAIN_INDEX]
                if unknown:
                    raise ValueError(f"{path}:{lineno}: unknown domain(s) {unknown} (known: {', '.join(schema.DOMAINS)})")
                self.add(ad.ad_id, ad.campaign_id, ad.advertiser_id, ad.domains or schema.DOMAINS)
                n += 1
        self.refresh_popular()
        return n

    def refresh_popular(self) -> None:
        with self._lock:
            ads = np.fromiter(self.ads.keys(), np.int64, len(self.ads))
            infos = list(self.ads.values())
        seen = np.fromiter((i.seen for i in infos), np.int64, len(infos))
        bits = np.fromiter((i.domains for i in infos), np.int64, len(infos))
        order = np.lexsort((ads, -seen))  # most seen first, ties by id
        popular = {}
        for i, d in enumerate(schema.DOMAINS):
            on = order[(bits[order] >> i & 1).astype(bool)]
            popular[d] = ads[on[:POPULAR_KEEP]].tolist()
        self._popular = popular
        self._popular_at = time.monotonic()

    def popular(self, domain: str, k: int) -> list[int]:
        """The ``k`` most frequent live ads seen on ``domain`` (at most :data:`POPULAR_KEEP`)."""
        if not self._popular and self.ads:
            self.refresh_popular()
        return self._popular.get(domain, [])[:k]

    def on_domain(self, ad_id: int, domain: str) -> bool:
        info = self.ads.get(ad_id)
        return info is not None and bool(info.domains >> schema.DOMAIN_INDEX[domain] & 1)

    def snapshot_ids(self) -> np.ndarray:
        with self._lock:
            return np.fromiter(self.ads.keys(), np.int64, len(self.ads))


class CatalogueFeed:
    """A consumer thread: every impression on ``cfg.topics.impressions`` enters the catalogue."""

    def __init__(self, cfg, catalogue: Catalogue, group: str = "streamrec-serve-catalogue"):
        self.cfg, self.catalogue, self.group = cfg, catalogue, group
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.consumed = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="serving-catalogue", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from streams.bus import kafka_io

        c = self.cfg
        consumer = kafka_io.make_consumer(c.kafka.bootstrap_servers, self.group, c.kafka.client,
                                          **{"fetch.wait.max.ms": 100})
        try:
            consumer.assign(kafka_io.topic_partitions([c.topics.impressions], c.topics.partitions))
            while not self._stop.is_set():
                msgs = consumer.consume(num_messages=5000, timeout=0.2)
                imps = []
                for m in msgs:
                    if m.error() is not None:
                        kafka_io.consumer_error(m.error(), "serving catalogue", log)
                        continue
                    ev = schema.decode(m.value(), schema.Impression)
                    if isinstance(ev, schema.Impression):
                        imps.append(ev)
                if imps:
                    self.catalogue.add_impressions(imps)
                    self.consumed += len(imps)
        except Exception:  # noqa: BLE001 - the catalogue stops growing; serving goes on
            log.exception("serving catalogue: the impressions consumer failed")
        finally:
            consumer.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)


class AdIndex:
    """One model version's ANN index over the catalogue's ads (see the module docstring)."""

    def __init__(self, published, catalogue: Catalogue, kind: str = "exact"):
        from embedding_store.ann import AnnConfig, make_index
        from trainer.features import SINGLE_FIELDS

        self.seq = published.seq
        self.catalogue_version = catalogue.version
        self.published = published
        self.ad_table = SINGLE_FIELDS.index("ad_id")
        self.user_table = SINGLE_FIELDS.index("user_id")
        self.index = make_index(AnnConfig(dim=published.tcfg.embedding_dim, kind=kind, device="cpu"))
        self.add(catalogue.snapshot_ids())

    def add(self, ids: np.ndarray) -> None:
        """Index these ads' vectors (replacing any already there)."""
        from serving.models import table_rows

        for i in range(0, len(ids), 65536):
            chunk = ids[i:i + 65536]
            self.index.upsert(chunk, table_rows(self.published, self.ad_table, chunk), 0)

    def add_new(self, catalogue: Catalogue) -> int:
        """Index the catalogue's ads this index does not hold yet (the same model version); returns how many."""
        version = catalogue.version
        ids = catalogue.snapshot_ids()
        new = ids[~np.isin(ids, self.index.ids())]
        self.add(new)
        self.catalogue_version = version
        return len(new)

    def __len__(self) -> int:
        return len(self.index)

    def search(self, user_ids: np.ndarray, k: int) -> np.ndarray:
        """(Q, k) ad ids nearest each user's vector, -1 padded."""
        from serving.models import table_rows

        q = table_rows(self.published, self.user_table, np.asarray(user_ids, np.uint64))
        _, ids = self.index.search(q, k)
        return ids


def retrieve(catalogue: Catalogue, index: AdIndex | None, user_ids: list[int], domains: list[str],
             k: int) -> list[list[int]]:
    """``k`` candidate ad ids per request: the index's nearest ads seen on the request's domain, topped up
    with the domain's most frequent ads (all of it when there is no index)."""
    out: list[list[int]] = [[] for _ in user_ids]
    if index is not None and len(index):
        found = index.search(np.asarray(user_ids, np.int64), min(len(index), 2 * k))
        for j, (row, dom) in enumerate(zip(found.tolist(), domains)):
            out[j] = [a for a in row if a >= 0 and catalogue.on_domain(a, dom)][:k]
    for j, dom in enumerate(domains):
        if len(out[j]) < k:
            have = set(out[j])
            out[j].extend(a for a in catalogue.popular(dom, k + len(have)) if a not in have)
            del out[j][k:]
    return out
