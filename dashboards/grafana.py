"""Grafana: the same dashboard definitions as the live page, as JSON for the ClickHouse data source plugin.

``streamrec dashboards export [--out DIR]`` writes one JSON file per dashboard, the data source (without
secrets) and the alert rules; ``streamrec dashboards push --grafana-url URL`` creates or updates the data source,
the folder ``streamrec``, the dashboards and the unified-alerting rules through grafana-client. Grafana credentials come from ``GRAFANA_TOKEN`` or ``GRAFANA_USER`` /
``GRAFANA_PASSWORD`` (or the URL); the ClickHouse credentials from ``metrics.clickhouse_url`` or
``CLICKHOUSE_USER`` / ``CLICKHOUSE_PASSWORD``. Grafana cannot reach the embedded chDB store: push needs a
ClickHouse server URL (``--clickhouse-url`` or ``metrics.clickhouse_url``).

>>> from dashboards.definitions import OVERVIEW
>>> d = grafana_dashboard_json(OVERVIEW)
>>> d["panels"][0]["targets"][0]["datasource"]["type"]
'grafana-clickhouse-datasource'
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from dashboards import alerts, queries
from dashboards.definitions import DASHBOARDS, Dashboard, Panel
from config import Config

PLUGIN = "grafana-clickhouse-datasource"
DATASOURCE_UID = "streamrec-clickhouse"
DATASOURCE_NAME = "streamrec ClickHouse"
FOLDER_UID, FOLDER_TITLE = "streamrec", "streamrec"
# drift reference (queries.drift_windows): 0 = the older half of the range's data; else the range shifted back
REF_SHIFTS = (("older half of the range", 0), ("1 h earlier", 3600), ("1 d earlier", 86400), ("7 d earlier", 604800))
# plugin query format: 0 = time series, 1 = table (src/types/queryBuilder.ts Format)
_FORMAT = {"timeseries": 0, "stat": 1, "table": 1}
_HEIGHT = {"stat": 4, "timeseries": 8, "table": 8}
_UNIT = {"": "none", "s": "s", "ops": "ops", "short": "short", "bytes": "bytes"}
_STATE = {"green": "green", "orange": "orange", "red": "red"}
REFRESH = "10s"


def datasource_json(clickhouse_url: str = "", database: str = "streamrec", *, with_secrets: bool = False) -> dict:
    """The data source payload (``POST /api/datasources``) for a ClickHouse server reached over HTTP(S)."""
    parts = urlsplit(clickhouse_url) if clickhouse_url else None
    secure = bool(parts and parts.scheme == "https")
    host = parts.hostname if parts and parts.scheme in ("http", "https") else "clickhouse"
    port = (parts.port if parts and parts.port else None) or (8443 if secure else 8123)
    user = unquote(parts.username) if parts and parts.username else os.environ.get("CLICKHOUSE_USER", "default")
    ds: dict[str, Any] = {
        "uid": DATASOURCE_UID, "name": DATASOURCE_NAME, "type": PLUGIN, "access": "proxy", "isDefault": False,
        "jsonData": {"host": host, "port": port, "protocol": "http", "secure": secure, "username": user,
                     "defaultDatabase": database}}
    if with_secrets:
        password = unquote(parts.password) if parts and parts.password else os.environ.get("CLICKHOUSE_PASSWORD", "")
        if password:
            ds["secureJsonData"] = {"password": password}
    return ds


def _thresholds(panel: Panel) -> dict:
    steps = [{"value": v, "color": _STATE.get(c, c)} for v, c in panel.thresholds] or [
        {"value": None, "color": "green"}]
    return {"mode": "absolute", "steps": steps}


def _panel_json(panel: Panel, pid: int, grid: dict, database: str) -> dict:
    ds = {"type": PLUGIN, "uid": DATASOURCE_UID}
    sql = queries.render(panel.sql, "grafana").replace("{db}", database).strip()
    out: dict[str, Any] = {
        "id": pid, "type": panel.kind, "title": panel.title, "description": panel.description, "gridPos": grid,
        "datasource": ds,
        "targets": [{"refId": "A", "datasource": ds, "editorType": "sql", "rawSql": sql,
                     "format": _FORMAT[panel.kind], "queryType": "timeseries" if panel.kind == "timeseries" else "table"}],
        "fieldConfig": {"defaults": {"unit": _UNIT.get(panel.unit, panel.unit), "thresholds": _thresholds(panel),
                                     "decimals": None if panel.unit in ("short",) else 3},
                        "overrides": []},
    }
    if panel.kind == "stat":
        out["options"] = {"colorMode": "value", "graphMode": "none", "textMode": "value",
                          "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
    elif panel.kind == "timeseries":
        out["fieldConfig"]["defaults"]["custom"] = {"drawStyle": "line", "lineWidth": 1, "spanNulls": True,
                                                    "showPoints": "auto", "thresholdsStyle": {"mode": "off"}}
        out["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                          "tooltip": {"mode": "multi", "sort": "none"}}
    else:
        out["options"] = {"showHeader": True, "cellHeight": "sm"}
    return out


def _layout(panels: tuple[Panel, ...]) -> list[dict]:
    """Grafana gridPos for each panel: left to right, wrapping at 24 columns; a row is as tall as its tallest."""
    out, x, y, row_h = [], 0, 0, 0
    for p in panels:
        w, h = min(p.width, 24), _HEIGHT[p.kind]
        if x + w > 24:
            x, y, row_h = 0, y + row_h, 0
        out.append({"x": x, "y": y, "w": w, "h": h})
        x, row_h = x + w, max(row_h, h)
    return out


def grafana_dashboard_json(dash: Dashboard, database: str = "streamrec", domains: tuple[str, ...] | None = None
                           ) -> dict:
    """The dashboard model (``POST /api/dashboards/db``'s ``dashboard``) for the ClickHouse plugin.

    Time filters and buckets use ``$__timeFilter`` / ``$__interval_s``; the domain filter is the dashboard
    variable ``domain`` ("all" or one domain)."""
    if domains is None:
        from streams.schema import DOMAINS as domains  # noqa: N811 - the one list of known domains
    options = ["all", *domains]
    variable = {"name": "domain", "label": "Domain", "type": "custom", "query": ",".join(options),
                "current": {"text": "all", "value": "all"},
                "options": [{"text": o, "value": o, "selected": o == "all"} for o in options],
                "multi": False, "includeAll": False, "hide": 0}
    ref = {"name": "ref_shift", "label": "Drift reference", "type": "custom",
           "query": ",".join(f"{label} : {v}" for label, v in REF_SHIFTS),
           "current": {"text": REF_SHIFTS[0][0], "value": str(REF_SHIFTS[0][1])},
           "options": [{"text": label, "value": str(v), "selected": i == 0} for i, (label, v) in enumerate(REF_SHIFTS)],
           "multi": False, "includeAll": False, "hide": 0}
    panels = [_panel_json(p, i + 1, g, database) for i, (p, g) in enumerate(zip(dash.panels, _layout(dash.panels)))]
    return {"uid": dash.uid, "title": dash.title, "description": dash.description, "tags": ["streamrec"],
            "timezone": "browser", "editable": True, "refresh": REFRESH, "schemaVersion": 39,
            "time": {"from": "now-1h", "to": "now"}, "templating": {"list": [variable, ref]}, "panels": panels}


# ---- CLI ------------------------------------------------------------------------------------------------
def export(out_dir: Path, cfg: Config) -> list[Path]:
    """Write ``<key>.json`` per dashboard and ``datasource.json`` (no secrets) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    url = cfg.metrics.clickhouse_url if cfg.metrics.clickhouse_url.startswith("http") else ""
    files = []
    for key, dash in DASHBOARDS.items():
        path = out_dir / f"{key}.json"
        path.write_text(json.dumps(grafana_dashboard_json(dash, cfg.metrics.database), indent=2) + "\n")
        files.append(path)
    path = out_dir / "datasource.json"
    path.write_text(json.dumps(datasource_json(url, cfg.metrics.database), indent=2) + "\n")
    files.append(path)
    path = out_dir / "alert-rules.json"
    path.write_text(json.dumps(alert_rules_json(cfg.metrics.database, cfg.dashboard.alerts), indent=2) + "\n")
    files.append(path)
    return files


def alert_rules_json(database: str, overrides=None) -> list[dict]:
    """Every rule of :data:`dashboards.alerts.RULES` (with ``dashboard.alerts`` overrides) as a Grafana
    provisioning payload (folder ``streamrec``)."""
    return [alerts.grafana_alert_rule(r, database, FOLDER_UID, DATASOURCE_UID)
            for r in alerts.configured(overrides).values()]


def _credential() -> str | tuple[str, str] | None:
    if os.environ.get("GRAFANA_TOKEN"):
        return os.environ["GRAFANA_TOKEN"]
    if os.environ.get("GRAFANA_USER"):
        return (os.environ["GRAFANA_USER"], os.environ.get("GRAFANA_PASSWORD", ""))
    return None  # grafana-client then uses user:password from the URL, if any


def push(grafana_url: str, clickhouse_url: str, database: str, *, timeout: float = 10.0,
         alert_overrides=None) -> dict[str, Any]:
    """Create or update the data source, then every dashboard; returns what Grafana answered."""
    from grafana_client import GrafanaApi
    from grafana_client.client import GrafanaClientError

    g = GrafanaApi.from_url(grafana_url, credential=_credential(), timeout=timeout)
    version = g.health.check().get("version", "?")
    ds = datasource_json(clickhouse_url, database, with_secrets=True)
    try:
        g.datasource.get_datasource_by_uid(DATASOURCE_UID)
        exists = True
    except GrafanaClientError as e:
        if e.status_code != 404:
            raise
        exists = False
    ds_answer = g.datasource.update_datasource_by_uid(DATASOURCE_UID, ds) if exists else g.datasource.create_datasource(ds)
    if not _exists(lambda: g.folder.get_folder(FOLDER_UID)):
        g.folder.create_folder(FOLDER_TITLE, uid=FOLDER_UID)
    answers = {}
    for key, dash in DASHBOARDS.items():
        answers[key] = g.dashboard.update_dashboard({
            "dashboard": grafana_dashboard_json(dash, database), "folderUid": FOLDER_UID, "overwrite": True,
            "message": "provisioned by streamrec dashboards push"})
    rules = {}
    for rule in alert_rules_json(database, alert_overrides):
        uid = rule["uid"]
        if _exists(lambda: g.alertingprovisioning.get_alertrule(uid)):
            g.alertingprovisioning.update_alertrule(uid, rule)
            rules[uid] = "updated"
        else:
            g.alertingprovisioning.create_alertrule(rule)
            rules[uid] = "created"
    return {"grafana_version": version, "datasource": "updated" if exists else "created",
            "datasource_answer": ds_answer, "dashboards": answers, "alert_rules": rules}


def _exists(get) -> bool:
    """True when ``get()`` answers, False on 404 (other errors propagate)."""
    from grafana_client.client import GrafanaClientError

    try:
        get()
        return True
    except GrafanaClientError as e:
        if e.status_code != 404:
            raise
        return False


def run(args: argparse.Namespace, cfg: Config) -> int:
    if args.dashboards_command == "export":
        out = Path(args.out or Path(cfg.data_dir, "grafana"))
        for path in export(out, cfg):
            print(path)
        return 0
    clickhouse_url = args.clickhouse_url or cfg.metrics.clickhouse_url
    if not clickhouse_url.startswith(("http://", "https://")):
        print("streamrec dashboards push: Grafana needs a ClickHouse server; set metrics.clickhouse_url or pass "
              f"--clickhouse-url http(s)://host:8123 (got {clickhouse_url or 'the embedded chDB store'!r})",
              file=sys.stderr)
        return 2
    res = push(args.grafana_url, clickhouse_url, cfg.metrics.database, alert_overrides=cfg.dashboard.alerts)
    print(f"grafana {res['grafana_version']}: data source {DATASOURCE_UID} {res['datasource']}; dashboards: "
          + ", ".join(f"{k} -> {a.get('url', a.get('status', '?')) if isinstance(a, dict) else a}"
                      for k, a in res["dashboards"].items())
          + f"; alert rules: {sum(v == 'created' for v in res['alert_rules'].values())} created, "
            f"{sum(v == 'updated' for v in res['alert_rules'].values())} updated")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboards", help="export the dashboards as Grafana JSON, or push them to Grafana",
                       description="Dashboards as code: the definitions behind the live page, rendered for Grafana's "
                                   "ClickHouse data source plugin (grafana-clickhouse-datasource).")
    p.set_defaults(func=lambda args, cfg: (p.print_help(), 2)[1])
    nested = p.add_subparsers(dest="dashboards_command", metavar="ACTION")
    ex = nested.add_parser("export", help="write one Grafana JSON file per dashboard plus datasource.json")
    ex.add_argument("--out", metavar="DIR", help="output directory (default: <data_dir>/grafana)")
    ex.set_defaults(func=run)
    pu = nested.add_parser("push", help="create/update the ClickHouse data source, the dashboards and the alert rules in Grafana",
                           description="Credentials: GRAFANA_TOKEN, or GRAFANA_USER/GRAFANA_PASSWORD, or the URL; "
                                       "ClickHouse's from --clickhouse-url / metrics.clickhouse_url or "
                                       "CLICKHOUSE_USER/CLICKHOUSE_PASSWORD.")
    pu.add_argument("--grafana-url", required=True, metavar="URL", help="e.g. http://localhost:3000")
    pu.add_argument("--clickhouse-url", metavar="URL",
                    help="ClickHouse server as Grafana reaches it (default: metrics.clickhouse_url)")
    pu.set_defaults(func=run)
