"""Dashboards as code: one definition per dashboard, rendered to Grafana JSON and to the live page.

A panel names its SQL template (from :mod:`dashboards.queries`), its kind, unit and thresholds; nothing else
knows SQL. Thresholds are ``(value, colour)`` steps, the first value ``None`` (the base colour), as in Grafana.

>>> d = DASHBOARDS["overview"]
>>> d.panel("quality").kind, len(d.panels) > 8
('table', True)
"""

from __future__ import annotations

from dataclasses import dataclass

from dashboards import queries as q
from dashboards.alerts import BACKLOG_ALERT

KINDS = ("timeseries", "stat", "table")
Thresholds = tuple[tuple[float | None, str], ...]

GOOD_AUC: Thresholds = ((None, "red"), (0.6, "orange"), (0.7, "green"))
GOOD_NE: Thresholds = ((None, "green"), (0.95, "orange"), (1.0, "red"))  # NE >= 1: worse than the base rate
CALIBRATED: Thresholds = ((None, "orange"), (0.9, "green"), (1.1, "orange"))
FRESH_S: Thresholds = ((None, "green"), (60.0, "orange"), (600.0, "red"))
NO_DEAD: Thresholds = ((None, "green"), (1.0, "orange"))
PSI: Thresholds = ((None, "green"), (0.1, "orange"), (0.25, "red"))  # population stability index bands
_REF = "by default the older half of the range's data; or the range shifted by the drift reference"


@dataclass(frozen=True)
class Panel:
    """One chart, number or table. ``sql`` is a template (macros expanded per target by ``queries.render``);
    ``width`` is in Grafana's 24-column grid (the page uses the same proportions)."""

    id: str
    title: str
    sql: str
    kind: str = "timeseries"
    unit: str = ""
    thresholds: Thresholds = ()
    description: str = ""
    width: int = 12
    # what must run for the panel to have data, said where it is empty (e.g. "streamrec up --serve")
    needs: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"panel {self.id!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if not self.id.replace("_", "").isalnum():
            raise ValueError(f"panel {self.id!r}: id must be letters, digits and underscores")

    def to_json(self) -> dict:
        return {"id": self.id, "title": self.title, "kind": self.kind, "unit": self.unit,
                "thresholds": [list(t) for t in self.thresholds], "description": self.description,
                "width": self.width, "needs": self.needs}


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    panels: tuple[Panel, ...]
    description: str = ""

    def __post_init__(self):
        ids = [p.id for p in self.panels]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise ValueError(f"dashboard {self.uid!r}: duplicate panel ids {sorted(dup)}")

    def panel(self, panel_id: str) -> Panel:
        for p in self.panels:
            if p.id == panel_id:
                return p
        raise KeyError(f"dashboard {self.uid!r} has no panel {panel_id!r}")

    def to_json(self) -> dict:
        return {"uid": self.uid, "title": self.title, "description": self.description,
                "panels": [p.to_json() for p in self.panels]}


OVERVIEW = Dashboard(
    uid="streamrec-overview",
    title="streamrec overview",
    description="Progressive-validation quality per domain and objective, arms side by side, drift, label delay, "
                "throughput, pipeline latency and log age, lag, embedding memory, dead letters.",
    panels=(
        Panel("stat_click_auc", "Click AUC", q.rollup_stat(q.R_AUC), "stat", "", GOOD_AUC,
              "pooled over selected domains (score buckets)", 3),
        Panel("stat_cvr_auc", "Conversion AUC", q.rollup_stat(q.R_AUC, "conversion"), "stat", "", GOOD_AUC,
              "pooled over selected domains (score buckets)", 3),
        Panel("stat_click_ne", "Click normalized entropy", q.rollup_stat(q.R_NE), "stat", "", GOOD_NE,
              "log loss / entropy of the base rate; below 1 beats predicting the base rate", 3),
        Panel("stat_click_calibration", "Click calibration", q.rollup_stat(q.R_CALIBRATION), "stat", "", CALIBRATED,
              "predicted / observed clicks", 3),
        Panel("stat_examples", "Examples scored", q.EXAMPLES_SCORED, "stat", "short", (), "in the window", 3),
        Panel("stat_pipeline_latency", "Pipeline latency p50", q.PIPELINE_LATENCY_P50, "stat", "s", FRESH_S,
              "labelled (labels flow) to stored (queryable here), median", 3),
        Panel("stat_log_age", "Log age", q.LOG_AGE_NOW, "stat", "s", (),
              "event time of the newest trained event to now (the input's age, not a delay of ours)", 3),
        Panel("stat_dead_letters", "Dead letters", q.DEAD_LETTERS_TOTAL, "stat", "short", NO_DEAD, "in the window", 3),
        Panel("arm_comparison", "Arms side by side", q.ARM_COMPARISON, "table", width=24,
              description="per arm, online: the traffic it served (impressions, CTR and conversions per impression "
                          "in %, Wilson 95% intervals); offline: its model's click predictions on every example it "
                          "scored (AUC with a DeLong 95% interval, normalized entropy with a delta-method "
                          f"95% interval). {q.LOGGED_ARM}: traffic streamrec did not serve"),
        Panel("click_auc", "Click AUC by domain", q.rollup_by_domain(q.R_AUC, "click"), thresholds=GOOD_AUC),
        Panel("cvr_auc", "Conversion AUC by domain", q.rollup_by_domain(q.R_AUC, "conversion"), thresholds=GOOD_AUC),
        Panel("click_ne", "Click normalized entropy by domain", q.rollup_by_domain(q.R_NE, "click"),
              thresholds=GOOD_NE),
        Panel("click_calibration", "Click calibration by domain", q.rollup_by_domain(q.R_CALIBRATION, "click"),
              thresholds=CALIBRATED, description="predicted / observed clicks"),
        Panel("prediction_drift", "Prediction drift (click-score PSI) by domain", q.prediction_drift_series(),
              thresholds=PSI, description=f"each bucket's score distribution against the reference ({_REF})"),
        Panel("feature_drift", "Feature drift (largest PSI) by domain", q.FEATURE_DRIFT_SERIES, thresholds=PSI,
              description=f"the most shifted dense feature per domain and bucket against the reference ({_REF})"),
        Panel("prediction_drift_table", "Prediction drift vs reference", q.PREDICTION_DRIFT, "table", width=10,
              thresholds=PSI, description=f"PSI of score distributions, current part against the reference "
                                          f"({_REF}); ref_from, ref_s: where the reference starts, how long it spans"),
        Panel("feature_drift_table", "Most drifted features", q.FEATURE_DRIFT, "table", width=14, thresholds=PSI,
              description=f"PSI per dense feature and domain against the reference ({_REF}); exact mean and "
                          "std now and then, from the stats flow"),
        Panel("throughput", "Throughput", q.THROUGHPUT, unit="ops",
              description="examples scored per second, and the rates each component reports"),
        Panel("freshness", "Pipeline latency", q.PIPELINE_LATENCY, unit="s", thresholds=FRESH_S,
              description="from the labels flow's emission to training and to this store, per training bucket"),
        Panel("log_age", "Log age when trained", q.LOG_AGE, unit="s",
              description="event time to training: the attribution window's wait plus the age of a replayed "
                          "log; the input's property, so no thresholds"),
        Panel("lag", "Lag (messages behind)", q.LAG, unit="short",
              description="produced minus consumed, from the counters each component publishes"),
        Panel("training_backlog", "Training backlog", q.TRAINING_BACKLOG, unit="short",
              thresholds=((None, "green"), (float(BACKLOG_ALERT), "red")),
              description="examples the labels dataflow emitted that the trainer has not trained yet; the "
                          f"training_backlog alert fires when it stays above {BACKLOG_ALERT:,} for a minute"),
        Panel("label_delay", "Label delay (feedback time minus impression time)", q.LABEL_DELAY, "table",
              description="clicks and conversions per delay bucket with cumulative shares, from the stats flow's "
                          "delay histograms of the examples whose windows closed in the range"),
        Panel("embedding_bytes", "Embedding memory by row width", q.EMBEDDING_BYTES, unit="bytes",
              description="bytes of embedding rows (weights and optimizer state) per row width, as the trainer "
                          "reports them: one width for fixed tables, one per size-class pool for FIITED"),
        Panel("join_state", "Labels join state", q.JOIN_STATE, unit="bytes",
              description="the attribution join's state, all partitions: bytes in memory (whole impressions of "
                          "the click window, the cold tier's index and caches) and bytes of the cold tier on disk "
                          "(docs/joinstate.md)"),
        Panel("join_compacted", "Labels join: compacted impressions", q.JOIN_COMPACTED, unit="short",
              description="impressions past their click window, compacted into the cold tier, waiting for their "
                          "conversion window to close (all partitions)"),
        Panel("fiited_meta", "FIITED bookkeeping", q.FIITED_META, unit="bytes",
              description="bytes of the FIITED store's metadata: slot map (admitted slots only), per-row arrays "
                          "and the admission sketch; it follows the live rows (empty for fixed-width backends)",
              needs="trainer.backend fiited"),
        Panel("user_vectors", "User-vector freshness", q.USER_VECTORS, unit="ms",
              description="user-model thread: arrival of a user's event to the user's updated vector"),
        Panel("embedding_dims", "Embedding rows by dimension", q.EMBEDDING_DIMS, "table",
              description="rows and bytes per embedding dimension (latest report)"),
        Panel("quality", "Quality by domain", q.QUALITY, "table", width=16,
              description="click and conversion metrics per domain over the window (exact, from raw rows)"),
        Panel("dead_letters_rate", "Dead letters by reason", q.DEAD_LETTERS_RATE, unit="ops", width=8),
        Panel("dead_letters", "Dead letters (latest reasons)", q.DEAD_LETTERS_BY_REASON, "table", width=16),
        Panel("serving", "Ranking service", q.SERVING, unit="short",
              description="streamrec serve: requests answered per second and latency percentiles (ms, body read "
                          "to answer ready), once a second", needs="streamrec up --serve"),
        Panel("publishing", "Published models: age at serving and delta size", q.PUBLISHING, unit="short",
              description="per arm: seconds since the newest training step of the version being served, and the "
                          "newest published delta as a percentage of a full snapshot",
              needs="streamrec up --serve (or trainer.publish_dir)"),
        Panel("transfer", "Foundation model: teacher coverage and age", q.TRANSFER, unit="short",
              description="the teacher join: share of examples that reached the VMs with the FM's prediction, and "
                          "that prediction's age when they left; per VM the age of the FM vectors it read and the "
                          "share of its lookups that missed (LoopFM); how far the FM and each VM trail the stream",
              needs="streamrec up --with-fm"),
        Panel("model_quality", "Models by domain", q.MODEL_QUALITY, "table", width=24,
              description="per model (the FM, each vertical model, each serving arm: the arm that scored) and "
                          "domain: progressive click AUC, NE and calibration (predicted / observed), conversion "
                          "AUC and NE"),
        Panel("early_stage", "Early-stage ranker: losses", q.EARLY_STAGE, unit="short",
              description="the cascade's early stage, trained beside each arm's ranker: its mean loss on the "
                          "labels and on the ranker's own scores (what keeps the ranker's best ads in its top K)",
              needs="trainer.early_stage: true"),
        Panel("semantic_ids", "Semantic IDs: ads coded, cold lookups", q.SEMANTIC_IDS, unit="short",
              description="per trainer reading semantic IDs (docs/coldstart.md): ads its codebook codes, of them "
                          "coded at birth from their creative, codebook refreshes, and the share of ad lookups "
                          "that found no code yet (the ad scored by its hashed raw id)",
              needs="trainer.ad_id_features sid/sid_ngram and AdCreative records (generate --creatives)"),
        Panel("cohorts", "Cohorts", q.COHORTS, "table", width=16, thresholds=GOOD_NE,
              description="click quality per cohort (domain/activity/country, trainer/cohorts.py) and arm, worst "
                          "normalized entropy first: the minority cohorts a global model neglects; C2AL "
                          "(trainer.c2al, docs/cohorts.md) targets them with training-only auxiliary heads"),
        Panel("solaris", "SOLARIS precompute", q.SOLARIS, unit="short",
              description="the precompute service (streamrec precompute): share of requests whose (user, ad) pair "
                          "it had computed with the FM before they came, the median age of those predictions, and "
                          "pairs computed per request (the budget, solaris.budget); per VM its pair cache's hit rate",
              needs="streamrec precompute and a VM with trainer.solaris"),
        Panel("precision", "Precision (LoKA)", q.PRECISION, "table", width=16,
              description="per trainer and dense layer: the kernel trainer.precision runs it with (auto: the "
                          "fastest whose probed error stays within trainer.precision_bound; docs/gpu.md), the "
                          "probe's mean relative GEMM error of fp8 with one scale per tensor, per row, and bf16, "
                          "the input's crest factor (absmax / RMS: outliers) and the share of gradient entries an "
                          "e4m3 cast would flush to zero",
              needs="trainer.precision auto, fp8 or bf16"),
        Panel("stack_health", "Stack health", q.STACK_HEALTH, "table", width=8,
              description="per process: seconds since its last report, and the supervisor's view (up, restarts, "
                          "crash looping)"),
    ),
)

DASHBOARDS: dict[str, Dashboard] = {"overview": OVERVIEW}
