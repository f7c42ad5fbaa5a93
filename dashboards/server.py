"""The dashboard process: sole owner of the metrics store, running the metrics sink and the live page.

``streamrec dashboard`` opens the store (chDB by default, or a ClickHouse server by URL), starts the
:class:`~dashboards.sink.MetricsSink` thread and serves, with Starlette + uvicorn on ``cfg.dashboard.host``:

* ``/``                                  the page (static HTML + JS drawing with the vendored uPlot);
* ``/api/dashboards``                    the dashboard definitions, refresh period, known domains;
* ``/api/panels/{panel_id}?minutes=&domain=&ref=&dashboard=``  one panel's rows, as ``{"columns", "rows": [{...}]}``
  (``ref``: minutes between the window and the drift reference window; 0 = the older half of the window's
  data against the newer half, :func:`dashboards.queries.drift_windows`);
* ``/api/alerts?domain=``                the alert rules' rows now, firing ones first, and the state of the
  message bus (``bus``) and of the metrics store (``store``) for the page's banner;
* ``/healthz``                           the sink's counters, ``bus`` and ``store``; 503 while the store is
  unreachable (a readiness answer: the process itself keeps serving and retrying, so do not restart it on this).

A store that cannot be reached (a ClickHouse server down or answering 5xx) does not stop the process: the page
is served, its banner says "metrics store unreachable", and the sink retries with a growing delay
(:meth:`dashboards.sink.MetricsSink.run`), losing nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import signal
import socket
import threading
import time
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from dashboards import alerts, queries
from dashboards.definitions import DASHBOARDS
from dashboards.sink import MetricsSink
from dashboards.store import Store
from streams import schema
from config import Config

log = logging.getLogger(__name__)
STATIC = Path(__file__).with_name("static")


def _json_value(v):
    if isinstance(v, (dt.datetime, dt.date)):
        return v.isoformat()
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return v


class BadRequest(ValueError):
    pass


def _params(request: Request, default_minutes: float) -> dict[str, object]:
    raw_min = request.query_params.get("minutes", "") or str(default_minutes)
    try:
        minutes = float(raw_min)
    except ValueError:
        raise BadRequest(f"minutes: expected a number, got {raw_min!r}") from None
    domain = request.query_params.get("domain", "")
    if domain in ("all", "*"):
        domain = ""
    if domain and domain not in schema.DOMAIN_INDEX:
        raise BadRequest(f"domain: unknown {domain!r} (known: {', '.join(schema.DOMAINS)})")
    raw_ref = request.query_params.get("ref", "") or "0"
    try:
        ref = float(raw_ref)
    except ValueError:
        raise BadRequest(f"ref: expected a number of minutes, got {raw_ref!r}") from None
    return queries.live_parameters(minutes, domain, ref)


def make_app(cfg: Config, store: Store, sink: MetricsSink | None = None) -> Starlette:
    """The ASGI app answering the page's queries from ``store``."""
    rules = alerts.configured(cfg.dashboard.alerts)

    def index(request: Request):
        return FileResponse(STATIC / "index.html")

    def dashboards(request: Request):
        return JSONResponse({"dashboards": {k: d.to_json() for k, d in DASHBOARDS.items()},
                             "refresh_s": cfg.dashboard.refresh_s, "window_minutes": cfg.dashboard.window_minutes,
                             "domains": list(schema.DOMAINS),
                             "alerts": [r.to_json() for r in rules.values()]})

    def panel(request: Request):
        dash = DASHBOARDS.get(request.query_params.get("dashboard", "overview"))
        if dash is None:
            return JSONResponse({"error": f"unknown dashboard (known: {', '.join(DASHBOARDS)})"}, 404)
        try:
            p = dash.panel(request.path_params["panel_id"])
            params = _params(request, cfg.dashboard.window_minutes)
        except KeyError as e:
            return JSONResponse({"error": str(e.args[0])}, 404)
        except BadRequest as e:
            return JSONResponse({"error": str(e)}, 400)
        t0 = time.perf_counter()
        try:
            res = store.query(queries.render(p.sql, "live"), params)
        except Exception as e:  # noqa: BLE001 - the page shows the message in the panel
            log.warning("panel %s: query failed: %s", p.id, e)
            return JSONResponse({"panel": p.id, "error": f"query failed: {str(e)[:500]}"}, 500)
        rows = [{c: _json_value(v) for c, v in zip(res.columns, r)} for r in res.rows]
        return JSONResponse({"panel": p.id, "kind": p.kind, "columns": res.columns, "rows": rows,
                             "params": params, "elapsed_ms": round((time.perf_counter() - t0) * 1000, 2)})

    def alert_states(request: Request):
        try:
            domain = _params(request, cfg.dashboard.window_minutes)["domain"]
        except BadRequest as e:
            return JSONResponse({"error": str(e)}, 400)
        states = alerts.evaluate(store, str(domain), rules)
        states.sort(key=lambda a: (not a["firing"], a["severity"] != "critical", a["rule"], str(a["series"])))
        bus = sink.bus_status() if sink is not None else None
        return JSONResponse({"alerts": states, "firing": sum(a["firing"] for a in states), "bus": bus,
                             "store": store.status()})

    def healthz(request: Request):
        counters = dict(sink.counters) if sink is not None else {}
        body = {"ok": True, "sink": sink is not None, "counters": counters,
                "bus": sink.bus_status() if sink is not None else None, "store": store.status()}
        if not body["store"]["ok"]:
            return JSONResponse({**body, "ok": False, "error": f"store: {body['store']['error']}"}, 503)
        since = request.query_params.get("since_ms")
        if since is not None:  # rows in the store, not only this process's inserts
            try:
                res = store.query(queries.render(queries.STORED_PREDICTIONS, "live"), {"since_ms": int(since)})
            except ValueError:
                return JSONResponse({"error": f"since_ms: expected an integer, got {since!r}"}, 400)
            except Exception as e:  # noqa: BLE001 - a busy or unreachable store is reported, not raised
                return JSONResponse({**body, "ok": False, "error": f"store: {str(e)[:300]}"}, 503)
            body["stored_predictions"] = int(res.rows[0][0])
        return JSONResponse(body)

    return Starlette(routes=[
        Route("/", index), Route("/api/dashboards", dashboards), Route("/api/panels/{panel_id}", panel),
        Route("/api/alerts", alert_states),
        Route("/healthz", healthz), Mount("/static", StaticFiles(directory=STATIC), name="static")])


class DashboardServer:
    """Store + optional sink thread + uvicorn thread. ``start()`` returns the URL; ``stop()`` ends both
    threads and closes the store (releasing the chDB path)."""

    def __init__(self, cfg: Config, *, port: int | None = None, sink: bool = True, store: Store | None = None):
        self.cfg = cfg
        self.port = cfg.dashboard.port if port is None else port
        self.own_store = store is None
        self.store = store
        self.with_sink = sink
        self.sink: MetricsSink | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server: uvicorn.Server | None = None
        self.url = ""

    def start(self) -> str:
        if self.store is None:  # an unreachable server is retried, not fatal (see the module docstring)
            self.store = Store.open(self.cfg.clickhouse_url(), self.cfg.metrics.database, retry=True,
                                    cluster=self.cfg.metrics.cluster)
        else:
            self.store.ensure_schema()
        if self.with_sink:
            self.sink = MetricsSink(self.cfg, self.store)
            t = threading.Thread(target=self.sink.run, args=(self._stop,), name="metrics-sink", daemon=True)
            t.start()
            self._threads.append(t)
        host = self.cfg.dashboard.host
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, self.port))
        except OSError as e:
            sock.close()
            self.stop()
            raise OSError(f"dashboard: cannot listen on {host}:{self.port}: {e}") from None
        port = sock.getsockname()[1]
        app = make_app(self.cfg, self.store, self.sink)
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        t = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="dashboard-http", daemon=True)
        t.start()
        self._threads.append(t)
        deadline = time.monotonic() + 15
        while not self._server.started and t.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self._server.started:
            self.stop()
            raise RuntimeError(f"dashboard: the web server on {host}:{port} did not start")
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{port}/"
        return self.url

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.should_exit = True
        for t in self._threads:
            t.join(timeout=15)
        self._threads.clear()
        if self.own_store and self.store is not None:
            self.store.close()
            self.store = None

    def __enter__(self) -> "DashboardServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def run_dashboard(cfg: Config, *, port: int | None = None, sink: bool = True,
                  stop_event: threading.Event | None = None) -> int:
    """Serve until ``stop_event`` is set (default: until SIGTERM / SIGINT). Prints the URL."""
    if stop_event is None:
        stop_event = threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stop_event.set())
    server = DashboardServer(cfg, port=port, sink=sink)
    url = server.start()
    print(f"dashboard: {url}  (store: {cfg.clickhouse_url().split('@')[-1]}, sink: {'on' if sink else 'off'})",
          flush=True)
    try:
        while not stop_event.wait(1.0):
            pass
    finally:
        server.stop()
    return 0


def run(args: argparse.Namespace, cfg: Config) -> int:
    return run_dashboard(cfg, port=args.port, sink=not args.no_sink)


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboard", help="metrics sink + live dashboard page (sole owner of the metrics store)",
                       description="Open the metrics store (chDB under the data dir, or metrics.clickhouse_url), "
                                   "consume the predictions / service_stats / dead_letters topics into it, and "
                                   "serve the live dashboard page. SIGTERM or Ctrl-C stops it.")
    p.add_argument("--port", type=int, default=None, help="port (default: dashboard.port; 0 = any free port)")
    p.add_argument("--no-sink", action="store_true",
                   help="serve the page only (another process or ClickHouse itself ingests the topics)")
    p.set_defaults(func=run)
