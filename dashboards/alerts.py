"""Alert rules, defined once: evaluated by the live page (banner and panel badges) and exported as Grafana
unified-alerting rules (``POST /api/v1/provisioning/alert-rules``).

A rule's SQL (a :mod:`dashboards.queries` template) returns rows ``(series, value)`` - one per domain, step
or whatever the rule splits by - and the rule fires for each row whose value crosses ``threshold``. The rule
looks at its own window (``window_s``), not at the page's range, so the page and Grafana agree on what is
firing. Drift rules compare the newer half of their window's data with the older half (``ref_shift_s`` 0,
:func:`dashboards.queries.drift_windows`): over 20 min of data, the last 10 min against the 10 before; in a
shorter run, the halves of what there is.

>>> sorted(RULES)
['component_silent', 'crash_loop', 'dead_letter_rate', 'feature_drift', 'freshness_lag', 'prediction_drift', 'quality_drop', 'training_backlog']
>>> RULES["prediction_drift"].fires(0.3), RULES["quality_drop"].fires(0.01)
(True, False)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from dashboards import queries as q
from dashboards.store import Store
from streams.names import Component, Stat

SEVERITIES = ("warning", "critical")
OPS = {">": "gt", "<": "lt"}


@dataclass(frozen=True)
class AlertRule:
    """``value op threshold`` per row of ``sql``; ``panel`` is the page panel that shows the evidence."""

    id: str
    title: str
    sql: str
    threshold: float
    op: str = ">"
    window_s: int = 600
    ref_shift_s: int = 0
    for_s: int = 120
    severity: str = "warning"
    summary: str = ""
    panel: str = ""

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"alert {self.id!r}: op must be one of {sorted(OPS)}, got {self.op!r}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"alert {self.id!r}: severity must be one of {SEVERITIES}, got {self.severity!r}")

    def fires(self, value: float | None) -> bool:
        if value is None:
            return False
        return value > self.threshold if self.op == ">" else value < self.threshold

    def to_json(self) -> dict:
        return {"id": self.id, "title": self.title, "threshold": self.threshold, "op": self.op,
                "window_s": self.window_s, "ref_shift_s": self.ref_shift_s, "severity": self.severity,
                "summary": self.summary, "panel": self.panel}


PSI_ALERT, FEATURE_PSI_ALERT = 0.2, 0.25  # PSI: < 0.1 stable, 0.1-0.25 moderate, > 0.25 significant shift
_DRIFT_S = 1200  # drift rules: the last 20 min, halves compared

_PRED_PSI = f"""
SELECT domain AS series, psi AS value FROM ({q.PREDICTION_DRIFT}) WHERE objective = 'click'"""
_FEATURE_PSI = f"""
SELECT domain AS series, max(psi) AS value FROM ({q.FEATURE_DRIFT}) GROUP BY domain"""
# reference AUC minus current AUC, per domain (click)
_AUC_DROP = f"""
SELECT c.series AS series, r.auc - c.auc AS value
FROM (SELECT toString(domain) AS series, {q.R_AUC} AS auc FROM {{db}}.prediction_rollup FINAL
      WHERE objective = 'click' AND $DRIFT_WINDOW(slot, {{db}}.prediction_rollup) AND $DOMAIN GROUP BY series) AS c
INNER JOIN (SELECT toString(domain) AS series, {q.R_AUC} AS auc FROM {{db}}.prediction_rollup FINAL
            WHERE objective = 'click' AND $REF_WINDOW(slot, {{db}}.prediction_rollup) AND $DOMAIN GROUP BY series) AS r
    ON c.series = r.series"""
# the trainer's own backlog: the labels dataflow's emission (wall clock) to trained: pipeline latency. Event
# time to trained also holds the label policy's wait (the whole click window under `window`: >= 15 min by
# design) and, in a replay, the log's age; the log-age panel shows it, but an alert on it fired on every
# healthy run
_TRAINING_LAG = """
SELECT toString(domain) AS series,
       quantile(0.5)((toUnixTimestamp64Milli(trained_ts) - toUnixTimestamp64Milli(emitted_ts)) / 1000.0) AS value
FROM {db}.predictions FINAL
WHERE objective = 'click' AND $WINDOW(trained_ts) AND $DOMAIN AND toUnixTimestamp64Milli(emitted_ts) > 0
GROUP BY series"""
# the smallest backlog (examples labelled, not yet trained) over the window, from 10 s buckets: it fires once
# the trainer stayed that far behind the whole window, not on the burst a finite log's end releases at once
# (`up --events 100000` hands the trainer ~100k examples together; it works them off in ~15 s). A window with
# fewer 10 s buckets than the window holds (a stack younger than the window) says 0
_BACKLOG = f"""
SELECT 'trainer' AS series, if(count() >= intDiv($WINDOW_S, 10), min(backlog), 0) AS value
FROM ({q.backlog("intDiv(toUnixTimestamp(ts), 10)")})"""
BACKLOG_ALERT = 20_000  # examples; a healthy trainer's steady backlog is its rate x its latency (~2k/s x 0.2 s here)
# long-running components silent for longer than the threshold: crashed, hung, or cut off from the broker
# (with the broker away nothing reports at all); replay is finite and ends its reports by design
_SILENT = f"""
SELECT toString(component) AS series, dateDiff('second', max(ts), now64(3)) AS value
FROM {{db}}.service_stats FINAL
WHERE $WINDOW(ts) AND component != '{Component.REPLAY}'
GROUP BY series"""
_CRASH_LOOP = f"""
SELECT splitByChar('.', toString(name))[2] AS series, argMax(value, ts) AS value
FROM {{db}}.service_stats FINAL
WHERE $WINDOW(ts) AND component = '{Component.SUPERVISOR}' AND startsWith(toString(name), '{Stat.CRASH_LOOPING}.')
GROUP BY series"""
_DEAD_RATE = """
SELECT toString(step) AS series, count() * 60 / $WINDOW_S AS value
FROM {db}.dead_letters FINAL
WHERE $WINDOW(ts)
GROUP BY series"""

RULES: dict[str, AlertRule] = {r.id: r for r in (
    AlertRule("prediction_drift", "Prediction drift", _PRED_PSI, PSI_ALERT, window_s=_DRIFT_S, panel="prediction_drift",
              summary="PSI of the click-score distribution, newer half of the last 20 min against the older half"),
    AlertRule("feature_drift", "Feature drift", _FEATURE_PSI, FEATURE_PSI_ALERT, window_s=_DRIFT_S,
              panel="feature_drift",
              summary="largest feature PSI per domain, newer half of the last 20 min against the older half"),
    AlertRule("quality_drop", "Quality drop", _AUC_DROP, 0.05, window_s=_DRIFT_S, severity="critical",
              panel="click_auc", summary="click AUC fell by more than 0.05, newer half of the last 20 min against "
                                         "the older half"),
    AlertRule("freshness_lag", "Training lag", _TRAINING_LAG, 300.0, window_s=300, panel="freshness",
              summary="median labelled-to-trained latency above 5 min: the trainer falls behind the labels"),
    AlertRule("training_backlog", "Training backlog", _BACKLOG, BACKLOG_ALERT, window_s=60, for_s=0,
              panel="training_backlog",
              summary=f"the trainer stayed more than {BACKLOG_ALERT:,} examples behind the labels dataflow for a "
                      "whole minute (labels examples_out - the examples the slowest trainer took): it trains slower "
                      "than examples arrive"),
    AlertRule("dead_letter_rate", "Dead-letter rate", _DEAD_RATE, 10.0, panel="dead_letters_rate",
              summary="more than 10 dead letters per minute from one step"),
    AlertRule("component_silent", "Component silent", _SILENT, 30.0, window_s=600, for_s=30, severity="critical",
              panel="stack_health", summary="a component sent no statistics for 30 s: down, hung or cut off from "
                                            "the broker"),
    AlertRule("crash_loop", "Crash loop", _CRASH_LOOP, 0.5, window_s=120, for_s=0, severity="critical",
              panel="stack_health", summary="a process keeps exiting within 30 s of its start; the supervisor "
                                            "restarts it with a growing delay (see its log)"),
)}


def configured(overrides: Mapping[str, Any] | None = None) -> dict[str, AlertRule]:
    """:data:`RULES` with the operator's ``dashboard.alerts`` overrides (threshold, window_s) applied; an
    unknown rule id is an error naming the known ones."""
    rules = dict(RULES)
    for rid, o in (overrides or {}).items():
        if rid not in rules:
            raise ValueError(f"dashboard.alerts: unknown rule {rid!r} (known: {', '.join(sorted(RULES))})")
        changes = {k: getattr(o, k) for k in ("threshold", "window_s") if getattr(o, k) is not None}
        rules[rid] = replace(rules[rid], **changes)
    return rules


def evaluate(store: Store, domain: str = "", rules: dict[str, AlertRule] | None = None) -> list[dict]:
    """Every rule's rows now: ``{"rule", "title", "severity", "series", "value", "threshold", "firing"}``;
    a rule whose query fails reports ``error`` instead of rows."""
    out = []
    for rule in (rules or RULES).values():
        params = {**q.live_parameters(rule.window_s / 60, domain), "window_s": rule.window_s,
                  "ref_shift_s": rule.ref_shift_s}
        base = {"rule": rule.id, "title": rule.title, "severity": rule.severity, "threshold": rule.threshold,
                "op": rule.op, "panel": rule.panel, "summary": rule.summary}
        try:
            rows = store.query(q.render(rule.sql, "live"), params).rows
        except Exception as e:  # noqa: BLE001 - one broken rule must not hide the others
            out.append({**base, "series": "", "value": None, "firing": False, "error": str(e)[:300]})
            continue
        for series, value in rows:
            out.append({**base, "series": series, "value": value, "firing": rule.fires(value)})
    return out


def grafana_alert_rule(rule: AlertRule, database: str, folder_uid: str, datasource_uid: str,
                       group: str = "streamrec") -> dict:
    """The provisioning payload of one rule: query A (ClickHouse, table format: string columns become labels),
    B = reduce(last) of A, C = threshold on B."""
    sql = q.render(rule.sql, "alert", ref_shift_s=rule.ref_shift_s).replace("{db}", database).strip()
    return {
        "uid": f"streamrec-{rule.id.replace('_', '-')}", "title": rule.title, "ruleGroup": group,
        "folderUID": folder_uid, "condition": "C", "for": f"{rule.for_s}s", "orgID": 1,
        "noDataState": "OK", "execErrState": "Error",
        "labels": {"severity": rule.severity, "team": "streamrec"},
        "annotations": {"summary": rule.summary, "panel": rule.panel},
        "data": [
            {"refId": "A", "datasourceUid": datasource_uid,
             "relativeTimeRange": {"from": rule.window_s, "to": 0},
             "model": {"refId": "A", "editorType": "sql", "rawSql": sql, "format": 1, "queryType": "table"}},
            {"refId": "B", "datasourceUid": "__expr__", "relativeTimeRange": {"from": 0, "to": 0},
             "model": {"refId": "B", "type": "reduce", "expression": "A", "reducer": "last",
                       "settings": {"mode": "dropNN"}}},
            {"refId": "C", "datasourceUid": "__expr__", "relativeTimeRange": {"from": 0, "to": 0},
             "model": {"refId": "C", "type": "threshold", "expression": "B",
                       "conditions": [{"evaluator": {"type": OPS[rule.op], "params": [rule.threshold]}}]}},
        ],
    }
