"""Micro-batching: concurrent requests share one forward pass per arm.

Requests become :class:`Job` objects on a queue; one worker thread takes the first waiting job, gathers more
until it holds ``serving.max_batch`` jobs or ``serving.max_wait_ms`` have passed since it took the first, then
scores the batch and resolves each job's future on its event loop (``call_soon_threadsafe``). The event loop
never runs model code, and while the worker scores one batch the next one forms on the queue, so under load
batches grow by themselves. The worker stops waiting early when every request the server is receiving is
already in the batch (``service.inflight``): a lone request is scored at once, not after ``max_wait_ms``.

With ``serving.cascade_k`` > 0 a request's candidates first go through the early-stage ranker published with
its arm's version, and only its top ``cascade_k`` are scored by the final ranker (:meth:`Batcher._cascade`).

Scoring a batch (:meth:`Batcher.process`): the arms' current versions are read once (a version swapped in
meanwhile serves the next batch); requests without candidates get theirs from the catalogue and their arm's
ANN index (one search for all of them); then per arm, the candidates of every request that arm scores (the
requests it serves, or all of them for a shadow arm) are concatenated into ONE
:func:`trainer.features.featurize_impressions` batch and ONE forward pass, and the scores are split back per
request and ranked by ``p_click``. Candidates are scored at position 0 (the ranker's position feature learns
the bias of a slot; the ranking itself must not depend on it); the served impression records its real position.
The served impressions go to the emitter, which answers the batch's requests once the broker acknowledged them
(``serving.ack_impressions``; :mod:`serving.emit`), so the next batch is scored meanwhile.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import msgspec
import numpy as np

from serving import api
from streams import schema

log = logging.getLogger(__name__)

SCORE_CHUNK = 16384  # rows per forward pass at most (a batch of long candidate lists is split)


@dataclass(eq=False)
class Job:
    """One ranking request on its way through the batcher. ``imps``: its candidates as impressions (position
    0) or None when the worker retrieves them; ``result``: a :class:`api.RankResponse` or :class:`api.BadRequest`."""

    req: api.RankRequest
    request_id: str
    ts: int
    arm: str
    imps: list[schema.Impression] | None
    t0: float
    loop: object = None
    fut: object = None
    result: object = None
    served: list[schema.Impression] = field(default_factory=list)


def impression(job_rid: str, i: int, req: api.RankRequest, ts: int, ad_id: int, campaign_id: int,
               advertiser_id: int) -> schema.Impression:
    ctx = req.context
    return schema.Impression(event_id=f"{job_rid}.c{i}", ts=ts, user_id=req.user_id, ad_id=ad_id,
                             campaign_id=campaign_id, advertiser_id=advertiser_id, domain=req.domain, position=0,
                             device=ctx.device, country=ctx.country, cat=ctx.cat, dense=ctx.dense,
                             history=ctx.history)


def score(published, imps: list[schema.Impression]) -> tuple[np.ndarray, np.ndarray]:
    """(p_click, p_conversion) of ``imps`` with one version: exactly trainer.score.score_impressions' call."""
    import torch

    from trainer.features import impression_batch

    pcs, pvs = [], []
    for s in range(0, len(imps), SCORE_CHUNK):
        chunk = imps[s:s + SCORE_CHUNK]
        with torch.no_grad():
            pc, pv = published.model(impression_batch(chunk, published.tcfg, published.device, published.user_view,
                                                      sids=getattr(published, "semantic_ids", None)))
        pcs.append(pc.float().cpu().numpy())
        pvs.append(pv.float().cpu().numpy())
    if len(pcs) == 1:
        return pcs[0], pvs[0]
    return np.concatenate(pcs), np.concatenate(pvs)


class Batcher:
    """The queue and its worker thread (see the module docstring). ``service`` provides ``slots`` (name ->
    :class:`serving.models.ModelSlot`), ``retrieve(jobs, published)``, ``stats`` and ``emit(impressions)``."""

    def __init__(self, service, max_batch: int, max_wait_ms: float, cascade_k: int = 0):
        self.service = service
        self.cascade_k = max(0, int(cascade_k))  # serving.cascade_k (see _cascade)
        self.cascaded = 0  # requests whose candidates the early stage cut
        self.cascade_cut = 0  # candidates it cut (never scored by the final ranker)
        self.max_batch = max(1, int(max_batch))
        self.max_wait_s = max(0.0, max_wait_ms) / 1000.0
        self.q: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.forwards = 0  # forward passes run (all arms)
        self.batches = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="serving-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Score what is queued, then end the worker."""
        if self._thread is not None:
            self.q.put(None)
            self._thread.join(timeout=60)
            self._thread = None

    def submit(self, job: Job) -> None:
        self.q.put(job)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            job = self.q.get()
            if job is None:
                break
            batch = [job]
            deadline = time.perf_counter() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    nxt = self.q.get_nowait()
                except queue.Empty:
                    left = deadline - time.perf_counter()
                    # nobody else is being received: waiting could only add latency
                    if left <= 0 or getattr(self.service, "inflight", self.max_batch) <= len(batch):
                        break
                    try:
                        nxt = self.q.get(timeout=left)
                    except queue.Empty:
                        break
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            served: list = []
            try:
                served = self.process(batch)
            except Exception as e:  # noqa: BLE001 - a scoring bug fails this batch's requests, not the service
                log.exception("serving: scoring a batch of %d requests failed", len(batch))
                for j in batch:
                    if j.result is None:
                        j.result = api.BadRequest(500, f"internal error while scoring: {type(e).__name__}: {e}")
            self.service.emit(served, lambda batch=batch: [self._resolve(j) for j in batch])

    @staticmethod
    def _resolve(job: Job) -> None:
        if job.loop is None:
            return

        def done(fut=job.fut, res=job.result):
            if not fut.done():
                fut.set_result(res)

        try:
            job.loop.call_soon_threadsafe(done)
        except RuntimeError:  # the loop closed (server shut down): nobody waits for the answer
            pass

    def _cascade(self, job: Job, pub) -> None:
        """The cascade (``serving.cascade_k``, trainer/early_stage.py): the early stage published with the
        request's arm's version ranks the request's candidates, and only its top ``max(cascade_k, k)`` go on to
        the final ranker (every arm, shadows too, scores those). A version without an early stage, or a request
        with no more candidates than that, is scored whole."""
        es = getattr(pub, "early_stage", None)
        keep = max(self.cascade_k, job.req.k)
        if es is None or len(job.imps) <= keep:
            return
        from trainer.early_stage import rank_impressions

        logits = rank_impressions(es, pub.tcfg, job.imps)
        top = np.argsort(-logits, kind="stable")[:keep]
        self.cascade_cut += len(job.imps) - keep
        job.imps = [job.imps[i] for i in top.tolist()]
        self.cascaded += 1

    def process(self, batch: list[Job]) -> list[schema.Impression]:
        """Score ``batch`` in place (each job's ``result`` and ``served`` set); returns the served impressions
        (the caller hands them to the emitter and answers the requests, see the module docstring)."""
        svc = self.service
        current = {name: slot.current for name, slot in svc.slots.items()}  # this batch's versions, read once
        live = []
        for j in batch:
            if current.get(j.arm) is None:
                j.result = api.BadRequest(503, f"arm {j.arm!r} has no model yet")
            else:
                live.append(j)
        need = [j for j in live if j.imps is None]
        if need:
            svc.retrieve(need, current)
            for j in need:
                if not j.imps:
                    j.result = api.BadRequest(503, "no candidates: the request names none and the catalogue of "
                                                   "live ads is empty (pass candidates, or --catalogue FILE)")
            live = [j for j in live if j.result is None]
        if not live:
            return []
        if self.cascade_k:
            for j in live:
                self._cascade(j, current[j.arm])
        self.batches += 1
        ranked: dict[str, dict[int, np.ndarray]] = {}
        for name, slot in svc.slots.items():
            pub = current[name]
            if pub is None:
                continue
            jobs = live if slot.shadow else [j for j in live if j.arm == name]
            if not jobs:
                continue
            imps = [imp for j in jobs for imp in j.imps]
            pc, pv = score(pub, imps)
            self.forwards += 1
            start = 0
            for j in jobs:
                n = len(j.imps)
                jpc, jpv = pc[start:start + n], pv[start:start + n]
                start += n
                order = np.argsort(-jpc, kind="stable")[:j.req.k]
                if slot.shadow:
                    ranked.setdefault(name, {})[id(j)] = order
                    continue
                ads = []
                for pos, c in enumerate(order.tolist()):
                    imp = j.imps[c]
                    ads.append(api.RankedAd(imp.ad_id, imp.campaign_id, imp.advertiser_id, pos, float(jpc[c]),
                                            float(jpv[c])))
                    j.served.append(msgspec.structs.replace(imp, event_id=f"{j.request_id}.{pos}", position=pos,
                                                            arm=name, model_version=pub.seq))
                ranked.setdefault("", {})[id(j)] = order
                j.result = api.RankResponse(request_id=j.request_id, arm=name, model_version=pub.seq,
                                            model_steps=pub.steps, ads=ads,
                                            took_ms=round((time.perf_counter() - j.t0) * 1000.0, 3))
        served = ranked.get("", {})
        for name, orders in ranked.items():
            if name:
                for j in live:
                    a, b = served.get(id(j)), orders.get(id(j))
                    if a is not None and b is not None and len(a):
                        svc.stats.shadow(name, len(np.intersect1d(a, b)) / len(a))
        svc.stats.batch(len(live))
        return [imp for j in live for imp in j.served]
