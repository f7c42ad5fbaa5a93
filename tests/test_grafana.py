"""Grafana JSON and provisioning: a stub Grafana (real HTTP server) records what ``streamrec dashboards push``
sends through grafana-client; the exported SQL, with Grafana's macros expanded, runs on chDB."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from dashboards import grafana
from dashboards.alerts import RULES
from dashboards.definitions import DASHBOARDS, OVERVIEW
from dashboards.sink import prediction_rows
from dashboards.store import Store, open_client
from deploy.cli import main
from streams import schema


class StubGrafana:
    """Answers the calls grafana-client makes; remembers every request (method, path, headers, body)."""

    def __init__(self):
        self.requests: list[dict] = []
        self.datasources: dict[str, dict] = {}
        self.folders: dict[str, dict] = {}
        self.rules: dict[str, dict] = {}
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _reply(self, code, body):
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n)) if n else None
                stub.requests.append({"method": self.command, "path": self.path, "body": body,
                                      "auth": self.headers.get("Authorization", "")})
                m, p = self.command, self.path
                if p == "/api/frontend/settings":
                    return self._reply(200, {"buildInfo": {"version": "11.0.0", "commit": "stub"}})
                if p == "/api/health":
                    return self._reply(200, {"database": "ok", "version": "11.0.0"})
                uid = p.rsplit("/", 1)[-1]
                if m == "GET" and p.startswith("/api/datasources/uid/"):
                    if uid in stub.datasources:
                        return self._reply(200, stub.datasources[uid])
                    return self._reply(404, {"message": "Data source not found"})
                if m == "POST" and p == "/api/datasources":
                    stub.datasources[body["uid"]] = body
                    return self._reply(200, {"id": 1, "uid": body["uid"], "message": "Datasource added"})
                if m == "PUT" and p.startswith("/api/datasources/uid/"):
                    stub.datasources[uid] = body
                    return self._reply(200, {"id": 1, "message": "Datasource updated"})
                if m == "GET" and p.startswith("/api/folders/"):
                    return self._reply(200, stub.folders[uid]) if uid in stub.folders else self._reply(
                        404, {"message": "folder not found"})
                if m == "POST" and p == "/api/folders":
                    stub.folders[body["uid"]] = body
                    return self._reply(200, {"uid": body["uid"], "title": body["title"]})
                if p.startswith("/api/v1/provisioning/alert-rules"):
                    if m == "GET":
                        return self._reply(200, stub.rules[uid]) if uid in stub.rules else self._reply(
                            404, {"message": "rule not found"})
                    if m == "POST" and body.get("folderUID") in stub.folders:
                        stub.rules[body["uid"]] = body
                        return self._reply(201, body)
                    if m == "PUT" and uid in stub.rules:
                        stub.rules[uid] = body
                        return self._reply(200, body)
                    return self._reply(400, {"message": "bad alert rule request (folder missing?)"})
                if m == "POST" and p == "/api/dashboards/db":
                    d = body["dashboard"]
                    return self._reply(200, {"status": "success", "uid": d["uid"], "url": f"/d/{d['uid']}/x"})
                return self._reply(404, {"message": f"stub: no route {m} {p}"})

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def test_push_provisions_datasource_and_dashboards(monkeypatch, capsys):
    monkeypatch.setenv("GRAFANA_TOKEN", "tok123")
    monkeypatch.setenv("STREAMREC_CONFIG", "")
    with StubGrafana() as g:
        argv = ["dashboards", "push", "--grafana-url", g.url, "--clickhouse-url", "https://reader:s3cret@ch.example:8443"]
        assert main(argv) == 0
        assert main(argv) == 0  # second push updates instead of creating
    calls = [(r["method"], r["path"]) for r in g.requests]
    assert ("POST", "/api/datasources") in calls and ("PUT", "/api/datasources/uid/streamrec-clickhouse") in calls
    assert all(r["auth"] == "Bearer tok123" for r in g.requests)
    ds = g.datasources["streamrec-clickhouse"]
    assert ds["type"] == "grafana-clickhouse-datasource"
    assert ds["jsonData"] == {"host": "ch.example", "port": 8443, "protocol": "http", "secure": True,
                              "username": "reader", "defaultDatabase": "streamrec"}
    assert ds["secureJsonData"] == {"password": "s3cret"}
    boards = [r["body"] for r in g.requests if r["path"] == "/api/dashboards/db"]
    assert len(boards) == 2 and all(b["overwrite"] for b in boards)
    d = boards[0]["dashboard"]
    assert d["uid"] == OVERVIEW.uid and len(d["panels"]) == len(OVERVIEW.panels)
    for panel, p in zip(OVERVIEW.panels, d["panels"]):
        sql = p["targets"][0]["rawSql"]
        assert p["title"] == panel.title and p["type"] == panel.kind
        assert p["targets"][0]["datasource"] == {"type": "grafana-clickhouse-datasource", "uid": "streamrec-clickhouse"}
        assert "$__timeFilter(" in sql and "FINAL" in sql and "streamrec." in sql, panel.id
        assert "{db}" not in sql and "{window_s" not in sql and "$WINDOW" not in sql, panel.id
    sqls = {p["title"]: p["targets"][0]["rawSql"] for p in d["panels"]}
    assert "arrayCumSum" in sqls["Click AUC by domain"] and "${domain}" in sqls["Click AUC by domain"]
    assert "arrayAUC" in sqls["Quality by domain"]
    assert all(b["folderUid"] == "streamrec" for b in boards) and "streamrec" in g.folders
    out = capsys.readouterr().out
    assert "data source streamrec-clickhouse created" in out and f"alert rules: {len(RULES)} created" in out
    assert f"alert rules: 0 created, {len(RULES)} updated" in out  # the second push
    _check_alert_rules(g.rules, [r for r in g.requests if "alert-rules" in r["path"]])


def _check_alert_rules(rules: dict, requests: list) -> None:
    assert len(rules) == len(RULES) and sum(r["method"] == "POST" for r in requests) == len(RULES)
    by_title = {r["title"]: r for r in rules.values()}
    for rule in RULES.values():
        body = by_title[rule.title]
        assert body["condition"] == "C" and body["folderUID"] == "streamrec" and body["ruleGroup"] == "streamrec"
        a, b, c = body["data"]
        assert a["datasourceUid"] == "streamrec-clickhouse" and a["relativeTimeRange"]["from"] == rule.window_s
        sql = a["model"]["rawSql"]
        assert "$__timeFilter(" in sql and "streamrec." in sql and "{db}" not in sql and "$" + "WINDOW" not in sql
        assert "${domain}" not in sql and "${ref_shift}" not in sql, "alert SQL cannot use dashboard variables"
        assert (b["model"]["type"], b["model"]["expression"]) == ("reduce", "A")
        ev = c["model"]["conditions"][0]["evaluator"]
        assert c["model"]["type"] == "threshold" and ev == {"type": "gt" if rule.op == ">" else "lt",
                                                            "params": [rule.threshold]}
        assert body["labels"]["severity"] == rule.severity


def test_push_refuses_the_embedded_store(monkeypatch, capsys):
    monkeypatch.setenv("STREAMREC_CONFIG", "")
    assert main(["dashboards", "push", "--grafana-url", "http://127.0.0.1:9"]) == 2
    assert "needs a ClickHouse server" in capsys.readouterr().err


def test_export_writes_json_without_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMREC_CONFIG", "")
    monkeypatch.setenv("STREAMREC_METRICS__CLICKHOUSE_URL", "http://u:hidden@ch:8123")
    assert main(["dashboards", "export", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alert-rules.json", "datasource.json", "overview.json"]
    text = (tmp_path / "datasource.json").read_text() + (tmp_path / "overview.json").read_text()
    assert "hidden" not in text
    board = json.loads((tmp_path / "overview.json").read_text())
    grid = [p["gridPos"] for p in board["panels"]]
    assert all(g["x"] + g["w"] <= 24 for g in grid)
    cells = {(g["y"] + dy, g["x"] + dx) for g in grid for dy in range(g["h"]) for dx in range(g["w"])}
    assert len(cells) == sum(g["w"] * g["h"] for g in grid), "panels overlap"


def _expand_grafana_macros(sql: str, now_s: int) -> str:
    """What the plugin does with its macros, for a one-hour range and 30 s interval, domain 'all'."""
    sql = re.sub(r"\$__timeFilter\((\w+)\)",
                 rf"\1 >= toDateTime({now_s - 3600}) AND \1 <= toDateTime({now_s})", sql)
    sql = sql.replace("$__fromTime", f"toDateTime({now_s - 3600})").replace("$__toTime", f"toDateTime({now_s})")
    return sql.replace("$__interval_s", "30").replace("${domain}", "all").replace("${ref_shift}", "0")


def test_grafana_sql_runs_on_clickhouse(tmp_path):
    rng, n, now_ms = np.random.default_rng(0), 600, int(time.time() * 1000)
    click = (rng.random(n) < 0.3).astype(int)
    batch = schema.PredictionBatch(
        model_version=1, trained_ts=now_ms - 5000, example_ids=[f"g{i}" for i in range(n)],
        domains=[("feed", "video")[i % 2] for i in range(n)], event_ts=[now_ms - 60_000] * n,
        emitted_ts=[now_ms - 30_000] * n, p_click=np.clip(0.3 + 0.3 * (click - 0.3) + rng.normal(0, 0.2, n), 0.01,
                                                          0.99).tolist(),
        p_conversion=[0.05] * n, click=click.tolist(), conversion=[0] * n)
    client = open_client(f"chdb://{tmp_path.resolve()}/ch")
    try:
        store = Store(client, "streamrec")
        store.ensure_schema()
        store.insert("predictions", prediction_rows([batch], now_ms))
        store.refresh_rollup(now_ms - 60_000, now_ms)
        board = grafana.grafana_dashboard_json(DASHBOARDS["overview"], "streamrec")
        now_s = int(time.time()) + 1
        for p in board["panels"]:
            res = store.query(_expand_grafana_macros(p["targets"][0]["rawSql"], now_s))
            if p["title"] in ("Click AUC", "Click AUC by domain", "Quality by domain"):
                assert res.rows and all(r[-1] is not None for r in res.rows if p["type"] != "table"), p["title"]
            if p["title"] == "Arms side by side":  # the batch names no arm: the default arm's model, logged traffic
                got = {r["arm"]: r for r in res.records()}
                assert list(got) == ["main", "(logged)"] and got["main"]["scored"] == n == got["(logged)"]["served"]
                assert got["main"]["auc_lo"] < got["main"]["auc"] < got["main"]["auc_hi"]
        for rule in grafana.alert_rules_json("streamrec"):  # the alert queries run too
            res = store.query(_expand_grafana_macros(rule["data"][0]["model"]["rawSql"], now_s))
            assert all(len(r) == 2 for r in res.rows), rule["title"]
    finally:
        client.close()
