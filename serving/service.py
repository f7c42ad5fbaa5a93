"""``streamrec serve``: the HTTP ranking service (Starlette + uvicorn, as the dashboard).

Endpoints (README "Serving" has request and response examples):

* ``POST /rank``: rank a user's candidates (or retrieved ones) with the user's arm's current model version;
  ``{"request_id", "arm", "model_version", "model_steps", "ads": [...], "took_ms"}``, ads by ``p_click``
  descending. Bad requests get a 4xx and ``{"error": reason}`` (:mod:`serving.api`), never a 500;
* ``GET /healthz``: the process is alive (200);
* ``GET /readyz``: 200 once every serving (non-shadow) arm has a model version, else 503 with the reason;
* ``GET /models``: per arm the version served, its steps, trained_ts, age, swaps and refused versions.

Inside (:class:`RankingService`): one :class:`serving.models.ModelSlot` per arm of ``serving.arms``, swapped by
the :class:`serving.models.Poller` thread as the trainer publishes (``<models_dir>/<arm>``); the
:class:`serving.batcher.Batcher` worker thread scoring concurrent requests together; the catalogue of live ads
and per-arm ANN indexes for requests without candidates (:mod:`serving.catalogue`); the
:class:`serving.emit.Emitter` thread writing served impressions and ServiceStats to the bus. Without a broker
(``kafka.bootstrap_servers`` empty outside ``streamrec up``) it serves all the same, without impressions,
stats or the live catalogue.

SIGTERM / Ctrl-C: stop accepting, answer every request already received, deliver what is pending, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Mapping

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from config import Config
from serving import api
from serving.batcher import Batcher, Job, impression
from serving.catalogue import AdIndex, Catalogue, CatalogueFeed, retrieve
from serving.emit import Emitter, ServingStats
from serving.models import ModelSlot, Poller, Store, arms_for_user, open_store
from streams.names import Stat

log = logging.getLogger(__name__)

INDEX_REBUILD_S = 5.0  # a grown catalogue is re-indexed at most this often (a new model version at once)


def max_body_bytes(max_candidates: int) -> int:
    """The largest ``/rank`` body read (413 beyond): room for the context and ``max_candidates`` objects."""
    return 64 * 1024 + 128 * max_candidates


class RankingService:
    """Everything but HTTP: arms, batching, candidates, impressions, stats (see the module docstring).

    ``stores``: arm name -> version store (default: :func:`serving.models.open_store` of
    ``<models_dir>/<arm>``); ``emit``: produce impressions and stats (default: when a broker is configured).
    """

    def __init__(self, cfg: Config, stores: Mapping[str, Store] | None = None, *, emit: bool | None = None,
                 catalogue: Catalogue | None = None, feed: bool | None = None, producer=None):
        self.cfg = cfg
        sc = cfg.serving
        names = [a.name for a in sc.arms]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"serving.arms: arm names must be unique and at least one given, got {names}")
        if all(a.shadow for a in sc.arms):
            raise ValueError("serving.arms: at least one arm must serve (not be a shadow)")
        if stores is None:
            from trainer.embeddings import resolve_device

            device = str(resolve_device(cfg.trainer.device))
            stores = {a.name: open_store(Path(cfg.models_dir(), a.name), device) for a in sc.arms}
        self.slots = {a.name: ModelSlot(a, stores.get(a.name)) for a in sc.arms}
        # the poller thread also rebuilds the ANN indexes after swaps (off the request path)
        self.poller = Poller(list(self.slots.values()), sc.poll_s, hooks=[self.refresh_indexes])
        self.stats = ServingStats()
        self.batcher = Batcher(self, sc.max_batch, sc.max_wait_ms, cascade_k=sc.cascade_k)
        self.catalogue = catalogue if catalogue is not None else Catalogue()
        self.indexes: dict[str, AdIndex] = {}
        self._index_built: dict[str, float] = {}
        has_broker = bool(cfg.kafka.bootstrap_servers)
        self.emit_on = (sc.emit_impressions and has_broker) if emit is None else emit
        self.feed = CatalogueFeed(cfg, self.catalogue) if (has_broker if feed is None else feed) else None
        self.emitter = Emitter(cfg, self.values, emit_impressions=self.emit_on, producer=producer) \
            if (self.emit_on or producer is not None) else None
        self._ids = itertools.count()
        self._rid_prefix = uuid.uuid4().hex[:8]
        self.max_body = max_body_bytes(sc.max_candidates)
        self.started = False
        self.inflight = 0  # /rank requests being received or scored (event loop thread; the batcher reads it)

    # -- lifecycle --
    def start(self) -> None:
        self.poller.poll_once()
        self.refresh_indexes()
        self.poller.start()
        self.batcher.start()
        if self.feed is not None:
            self.feed.start()
        if self.emitter is not None:
            self.emitter.start()
        self.started = True

    def stop(self) -> None:
        """After the HTTP server stopped: score what is queued, stop the threads, deliver what is pending."""
        self.batcher.stop()
        self.poller.stop()
        if self.feed is not None:
            self.feed.stop()
        if self.emitter is not None:
            self.emitter.stop()
        self.started = False

    # -- models --
    def missing_arms(self) -> list[str]:
        return [n for n, s in self.slots.items() if not s.shadow and s.current is None]

    def refresh_indexes(self) -> None:
        """A serving arm's ANN index: built when there is none, rebuilt for a new model version, extended with
        the catalogue's new ads; rebuilds and extensions at most every :data:`INDEX_REBUILD_S` per arm."""
        for name, slot in self.slots.items():
            pub = slot.current
            if slot.shadow or pub is None or not len(self.catalogue):
                continue
            idx = self.indexes.get(name)
            due = time.monotonic() - self._index_built.get(name, 0.0) > INDEX_REBUILD_S
            if idx is None or (due and idx.published is not pub):
                self.indexes[name] = AdIndex(pub, self.catalogue)
            elif due and idx.catalogue_version != self.catalogue.version:
                idx.add_new(self.catalogue)
            else:
                continue
            self._index_built[name] = time.monotonic()

    def retrieve(self, jobs: list[Job], current: Mapping[str, object]) -> None:
        """Fill ``imps`` of requests without candidates (batcher thread): one index search per arm."""
        k = self.cfg.serving.retrieve_k
        for arm in {j.arm for j in jobs}:
            mine = [j for j in jobs if j.arm == arm]
            idx = self.indexes.get(arm)
            found = retrieve(self.catalogue, idx, [j.req.user_id for j in mine], [j.req.domain for j in mine], k)
            for j, ads in zip(mine, found):
                imps = []
                for a in ads:
                    info = self.catalogue.get(a)
                    if info is not None:
                        imps.append(impression(j.request_id, len(imps), j.req, j.ts, a, info.campaign_id,
                                               info.advertiser_id))
                j.imps = imps

    # -- requests --
    def prepare(self, req: api.RankRequest, t0: float) -> Job | api.BadRequest:
        """A checked request -> a job for the batcher, or why not (422 unknown ads, 503 no model)."""
        missing = self.missing_arms()
        arm = arms_for_user(req.user_id, self.cfg.serving.arms)
        if arm in missing:
            return api.BadRequest(503, f"arm {arm!r} has no model version yet (waiting for the trainer to publish "
                                       f"under {Path(self.cfg.models_dir(), arm)})")
        rid = req.request_id or f"{self._rid_prefix}-{next(self._ids)}"
        ts = req.ts if req.ts is not None else int(time.time() * 1000)
        imps = None
        if req.candidates is not None:
            imps, unknown = [], []
            get = self.catalogue.get
            for i, c in enumerate(req.candidates):
                if isinstance(c, int):
                    ad, camp, adv = c, None, None
                else:
                    ad, camp, adv = c.ad_id, c.campaign_id, c.advertiser_id
                if camp is None or adv is None:
                    info = get(ad)
                    if info is None:
                        unknown.append(ad)
                        continue
                    camp = info.campaign_id if camp is None else camp
                    adv = info.advertiser_id if adv is None else adv
                imps.append(impression(rid, i, req, ts, ad, camp, adv))
            if unknown:
                return api.BadRequest(422, f"unknown ad id(s) {unknown[:10]}{' ...' if len(unknown) > 10 else ''}: "
                                           "not in the catalogue of live ads; give campaign_id and advertiser_id")
        return Job(req=req, request_id=rid, ts=ts, arm=arm, imps=imps, t0=t0)

    async def rank(self, body: bytes, t0: float) -> tuple[int, bytes]:
        """One ``/rank`` body -> (status, JSON bytes)."""
        self.inflight += 1
        try:
            return await self._rank(body, t0)
        finally:
            self.inflight -= 1

    async def _rank(self, body: bytes, t0: float) -> tuple[int, bytes]:
        req = api.parse(body, self.cfg.serving.max_candidates)
        if isinstance(req, api.RankRequest):
            job = self.prepare(req, t0)
            if isinstance(job, Job):
                loop = asyncio.get_running_loop()
                job.loop, job.fut = loop, loop.create_future()
                self.batcher.submit(job)
                res = await job.fut
            else:
                res = job
        else:
            res = req
        if isinstance(res, api.RankResponse):
            self.stats.request(200, (time.perf_counter() - t0) * 1000.0)
            return 200, api.encoder.encode(res)
        self.stats.request(res.status, 0.0)
        return res.status, api.encoder.encode(api.Error(res.reason))

    def emit(self, imps, answer) -> None:
        """Hand ``imps`` to the emitter and call ``answer()`` to answer their requests: once the broker
        acknowledged them with ``serving.ack_impressions``, else at once."""
        if self.emitter is not None and self.emit_on and self.cfg.serving.ack_impressions and imps:
            self.emitter.put(imps, on_delivered=answer)
            return
        if self.emitter is not None:
            self.emitter.put(imps)
        answer()

    def values(self) -> dict[str, float]:
        """The ServiceStats values now (the emitter publishes them every second)."""
        out = self.stats.take()
        now = int(time.time() * 1000)
        for name, slot in self.slots.items():
            cur = slot.current
            out[f"{Stat.ARM_REFUSED_PREFIX}{name}"] = float(slot.refused)
            if cur is not None:
                out[f"{Stat.ARM_SEQ_PREFIX}{name}"] = float(cur.seq)
                if cur.trained_ts:
                    out[f"{Stat.ARM_MODEL_AGE_PREFIX}{name}"] = (now - cur.trained_ts) / 1000.0
        out[Stat.CATALOGUE_ADS] = float(len(self.catalogue))
        return out

    def models(self) -> dict:
        return {"arms": [s.describe() for s in self.slots.values()], "ready": not self.missing_arms(),
                "catalogue_ads": len(self.catalogue),
                "indexes": {n: {"seq": i.seq, "ads": len(i)} for n, i in self.indexes.items()},
                "batcher": {"max_batch": self.batcher.max_batch, "batches": self.batcher.batches,
                            "forwards": self.batcher.forwards, "cascade_k": self.batcher.cascade_k,
                            "cascaded": self.batcher.cascaded, "cascade_cut": self.batcher.cascade_cut}}


def _json(status: int, body: bytes) -> Response:
    return Response(body, status_code=status, media_type="application/json")


def _error(status: int, reason: str) -> Response:
    return _json(status, api.encoder.encode(api.Error(reason)))


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None when it is over ``limit`` bytes (stops reading there)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                return None
        except ValueError:
            pass
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def make_app(svc: RankingService) -> Starlette:
    """The ASGI app of ``svc``."""

    async def rank(request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            body = await _read_body(request, svc.max_body)
        except ClientDisconnect:
            return _error(400, "client disconnected before sending the whole body")
        if body is None:
            svc.stats.request(413, 0.0)
            return _error(413, f"request body over {svc.max_body} bytes")
        status, out = await svc.rank(body, t0)
        return _json(status, out)

    async def healthz(request: Request) -> Response:
        return _json(200, b'{"ok":true}')

    async def readyz(request: Request) -> Response:
        missing = svc.missing_arms()
        if missing:
            return _error(503, f"no model version yet for arm(s) {', '.join(missing)} (under {svc.cfg.models_dir()})")
        return _json(200, api.encoder.encode({"ready": True, "arms": {n: s.current.seq for n, s in svc.slots.items()
                                                                     if s.current is not None}}))

    async def models(request: Request) -> Response:
        return _json(200, api.encoder.encode(svc.models()))

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return _error(exc.status_code, exc.detail or "error")

    async def internal(request: Request, exc: Exception) -> Response:
        log.exception("serving: %s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(500, f"internal error: {type(exc).__name__}")

    return Starlette(routes=[Route("/rank", rank, methods=["POST"]), Route("/healthz", healthz),
                             Route("/readyz", readyz), Route("/models", models)],
                     exception_handlers={HTTPException: http_error, Exception: internal})


class ServingServer:
    """:class:`RankingService` + a uvicorn thread. ``start()`` returns the URL; ``stop()`` stops accepting,
    waits for the requests in flight to be answered, then stops the service."""

    def __init__(self, cfg: Config, service: RankingService | None = None, *, host: str | None = None,
                 port: int | None = None):
        self.cfg = cfg
        self.service = service or RankingService(cfg)
        self.host = cfg.serving.host if host is None else host
        self.port = cfg.serving.port if port is None else port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def start(self) -> str:
        host = self.host
        # proto IPPROTO_TCP (not 0): asyncio sets TCP_NODELAY only on such sockets; without it a response
        # written in two parts (head, body) waits for the client's delayed ACK, ~40 ms a request
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM,
                             socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted sockets (Linux)
        try:
            sock.bind((host, self.port))
        except OSError as e:
            sock.close()
            raise OSError(f"serve: cannot listen on {host}:{self.port}: {e}") from None
        port = sock.getsockname()[1]
        if not self.service.started:
            self.service.start()
        self._server = uvicorn.Server(uvicorn.Config(make_app(self.service), log_level="warning", lifespan="off",
                                                     access_log=False, backlog=2048,
                                                     timeout_graceful_shutdown=30))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="serving-http",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self._server.started:
            self.stop()
            raise RuntimeError(f"serve: the web server on {host}:{port} did not start")
        self.port = port
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
        self.service.stop()

    def __enter__(self) -> "ServingServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def set_torch_threads() -> int:
    """Intra-op threads for the forward passes: every core but one, which the event loop needs (on 2 cores, 1:
    two OpenMP threads on an oversubscribed pair of cores stall at their barriers for tens of ms, measured)."""
    import torch

    n = max(1, (os.cpu_count() or 1) - 1)
    if torch.get_num_threads() > n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def run_serve(cfg: Config, *, host: str | None = None, port: int | None = None, catalogue_file: str | None = None,
              stop_event: threading.Event | None = None, stores: Mapping[str, Store] | None = None,
              on_start=None) -> int:
    """Serve until ``stop_event`` is set (default: until SIGTERM / SIGINT). ``stores``: see
    :class:`RankingService`; ``on_start(server)``: called once it listens."""
    from trainer.embeddings import quiet_fbgemm_logs

    quiet_fbgemm_logs()
    set_torch_threads()
    if stop_event is None:
        stop_event = threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stop_event.set())
    catalogue = Catalogue()
    if catalogue_file:
        try:
            n = catalogue.load_file(catalogue_file)
        except (OSError, ValueError) as e:
            print(f"streamrec serve: --catalogue: {e}", file=sys.stderr)
            return 2
        print(f"serve: {n} ads from {catalogue_file}", flush=True)
    try:
        svc = RankingService(cfg, stores, catalogue=catalogue)
    except (ImportError, ValueError) as e:
        print(f"streamrec serve: {e}", file=sys.stderr)
        return 2
    announced, waiting = [False], False

    def announce_ready(slot, new) -> None:  # the poller thread at each swap, until every arm has a model
        if waiting and not announced[0] and not svc.missing_arms():
            announced[0] = True
            print("serve: ready (" + ", ".join(f"{n} v{s.current.seq}" for n, s in svc.slots.items()
                                             if s.current is not None) + ")", flush=True)

    for slot in svc.slots.values():
        slot.on_swap.append(announce_ready)
    server = ServingServer(cfg, svc, host=host, port=port)
    try:
        url = server.start()
    except (OSError, RuntimeError) as e:
        print(f"streamrec serve: {e}", file=sys.stderr)
        svc.stop()
        return 2
    arms = ", ".join(f"{a.name}{' (shadow)' if a.shadow else f' {a.share:g}'}" for a in cfg.serving.arms)
    print(f"serve: {url}/rank  (arms: {arms}; models: {cfg.models_dir()}; max_batch {cfg.serving.max_batch}, "
          f"max_wait_ms {cfg.serving.max_wait_ms:g}; impressions: "
          f"{cfg.topics.impressions if svc.emit_on else 'off'})", flush=True)
    if not cfg.kafka.bootstrap_servers:
        print("serve: no broker configured (kafka.bootstrap_servers): served impressions, stats and the live "
              "catalogue are off", flush=True)
    missing = svc.missing_arms()
    if missing:
        print(f"serve: no model version yet for arm(s) {', '.join(missing)} under {cfg.models_dir()}: /readyz "
              "answers 503 and /rank 503 until the trainer publishes one (trainer.publish_dir); the first version "
              "is picked up as it appears", flush=True)
    waiting = bool(missing)
    announce_ready(None, None)  # in case the first versions came while we printed
    if on_start is not None:
        on_start(server)
    try:
        while not stop_event.wait(0.5):
            pass
    finally:
        print("serve: stopping: answering the requests in flight", flush=True)
        server.stop()
    return 0


def run(args: argparse.Namespace, cfg: Config) -> int:
    return run_serve(cfg, host=args.host, port=args.port, catalogue_file=args.catalogue)


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="the HTTP ranking service (POST /rank) serving the trainer's published models",
                       description="Rank ads for a user with the newest published model version of the user's arm "
                                   "(serving.arms, <models_dir>/<arm>); concurrent requests share one forward "
                                   "pass; every served ad becomes an impression on the impressions topic. "
                                   "Endpoints: POST /rank, GET /healthz, /readyz, /models. SIGTERM or Ctrl-C "
                                   "stops it after answering the requests in flight.")
    p.add_argument("--host", default=None, help="address to bind (default: serving.host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: serving.port, 8060; 0 = any free port)")
    p.add_argument("--catalogue", metavar="FILE", default=None,
                   help="JSON lines {ad_id, campaign_id, advertiser_id, domains} added to the catalogue of live "
                        "ads (candidates for requests that name none; metadata for plain ad ids)")
    p.set_defaults(func=run)


