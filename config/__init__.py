"""Configuration in one place: defaults, then a YAML/JSON file, then environment variables.

Embedded and production differ only in values: leave ``kafka.bootstrap_servers`` empty to start the
embedded broker, or set it (``STREAMREC_KAFKA__BOOTSTRAP_SERVERS=broker:9092``) to use a real cluster;
``metrics.clickhouse_url`` is ``chdb:///abs/path`` for the embedded engine or ``http(s)://host:8123``.

Environment variables are ``STREAMREC_<SECTION>__<FIELD>`` (upper case), or ``STREAMREC_DATA_DIR``; values are parsed as YAML
scalars, so ``STREAMREC_TRAINER__BATCH_SIZE=1024`` is an int.

>>> cfg = load_config(env={"STREAMREC_TRAINER__BATCH_SIZE": "256", "STREAMREC_TOPICS__PARTITIONS": "2"})
>>> cfg.trainer.batch_size, cfg.topics.partitions, cfg.kafka.bootstrap_servers
(256, 2, '')
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, get_type_hints

import msgspec
import yaml

ENV_PREFIX = "STREAMREC_"
# what every broker-backed command says when kafka.bootstrap_servers is empty outside `streamrec up`
NO_BROKER = "no broker configured: set STREAMREC_KAFKA__BOOTSTRAP_SERVERS or use `streamrec up`"


class ConfigError(ValueError):
    """The configuration file or an environment variable has a bad value."""


LEARN_FROM = ("all", "own")  # which logged traffic an arm's trainer learns from (docs/arms.md)
# an arm's name is a token that is also a safe directory name (<models_dir>/<arm>, <checkpoint_dir>/<arm>)
ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ARM_NAME_RULE = "1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit"
SHARE_TOLERANCE = 1e-6  # the non-shadow arms' shares must sum to 1 within this


class KafkaConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    bootstrap_servers: str = ""  # empty: start the embedded Tansu broker
    # librdkafka passthrough (SASL/TLS etc.), e.g. {"security.protocol": "SASL_SSL"}
    client: dict[str, str] = {}


class TopicsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    impressions: str = "impressions"
    clicks: str = "clicks"
    conversions: str = "conversions"
    examples: str = "examples"
    dead_letters: str = "dead_letters"
    predictions: str = "predictions"
    service_stats: str = "service_stats"
    feature_stats: str = "feature_stats"
    # foundation-model transfer (docs/transfer.md): the FM's predictions for every example it scores, the
    # examples joined with them for the vertical models, and the FM's intermediate embeddings (LoopFM)
    teacher_predictions: str = "teacher_predictions"
    examples_distilled: str = "examples_distilled"
    fm_embeddings: str = "fm_embeddings"
    # SOLARIS (trainer/solaris.py): the precompute service's FM pair predictions, keyed by user id
    solaris_pairs: str = "solaris_pairs"
    # ad creatives (issue 18): one AdCreative record per ad at its birth (content embedding, category path)
    ads: str = "ads"
    partitions: int = 4  # impressions, clicks and conversions must share this count

    def input_topics(self) -> tuple[str, str, str]:
        return (self.impressions, self.clicks, self.conversions)

    def all(self) -> tuple[str, ...]:
        return (self.impressions, self.clicks, self.conversions, self.examples, self.dead_letters,
                self.predictions, self.service_stats, self.feature_stats, self.teacher_predictions,
                self.examples_distilled, self.fm_embeddings, self.solaris_pairs, self.ads)


class LabelsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    click_window_s: int = 15 * 60
    conversion_window_s: int = 24 * 3600
    policy: str = "window"  # window | elapsed (ES-DFM: emit after elapsed_s, then late-positive corrections)
    elapsed_s: int = 3600  # the `elapsed` policy's wait before a first label
    pace_slack_s: int = 60  # how far (event time) one input topic may run ahead of the others before pausing
    # Tailing: a topic-partition at its end still holds event time back (more may come) until idle this long;
    # then windows may close without it. Bounded runs release it at once.
    idle_s: float = 30.0
    batch_size: int = 20000  # messages per source poll per partition
    recovery_dir: str = ""  # Bytewax recovery directory ("" = no recovery)


@dataclass(frozen=True)
class FiitedConfig:
    """Knobs of :class:`embedding_store.fiited.FiitedEmbeddings` (and its reference twin).

    A full row is ``num_chunks * chunk_dim`` wide (= the trainer's ``embedding_dim``); a row lives in the
    pool of one of ``pool_chunks`` (allowed chunk counts, ascending, last = ``num_chunks``).

    * ``budget``: pool bytes (weights + row-wise momentum) allowed, as a fraction of fixed full-width tables
      (``T * rows * (D + 1) * 4``); :func:`importance.assign_chunks` fits the live rows under it.
    * ``maintain_every``: steps between eviction passes; ``resize_every``: steps between resizes.
    * ``admit_hits``: a slot keeps using its table's shared row until it was seen this many times (0: it gets
      its own row before its first training lookup, while the budget has room; >= 2: sightings are counted
      in the count-min sketch); a slot that earned a row but found no room tries again when next seen.
    * ``ttl_steps``: a row unseen for this many steps is evicted unless its importance is in the top
      ``protect_quantile`` of live rows (the floor).
    * ``decay``: importance multiplier per maintenance pass (old gradient energy fades).
    * ``resize_fill``: a resize fits the live rows into this fraction of the budget; the rest is room for ids
      admitted before the next resize.
    * ``grow_momentum``: a row moved to a wider pool keeps this fraction of its row-wise Adagrad momentum
      (new chunks start at zero and must learn fast; the row's full momentum would freeze them).
    * ``headroom``: spare rows per pool after a compaction (fraction of the live rows).
    * ``kernel``: the lookup/update path (embedding_store/kernels): ``auto`` (the C++ kernel on the CPU, torch ops
      on other devices), ``cpp``, ``torch`` or ``fbgemm`` (the old per-pool TBE path, CPU); the environment
      variable ``STREAMREC_FIITED_KERNEL`` overrides it (for comparisons).
    * ``live_budget``: 0 (off) or the private-row bytes allowed as a fraction of the *admitted* rows at full
      width (a budget that follows the live ids instead of the virtual slots; the smaller of the two binds).
    * ``importance_power``: a row asks for chunks proportional to ``importance ** importance_power``.
    * ``sketch_width`` / ``sketch_depth``: the count-min sketch (uint8 counters) that counts candidates'
      sightings when ``admit_hits >= 2`` (no per-slot counters for ids that never earn a row).
    """

    chunk_dim: int = 8
    num_chunks: int = 8
    pool_chunks: tuple[int, ...] = (1, 2, 4, 8)
    budget: float = 0.25
    maintain_every: int = 50
    resize_every: int = 200
    admit_hits: int = 0
    ttl_steps: int = 5_000
    protect_quantile: float = 0.9
    decay: float = 0.5
    resize_fill: float = 0.9
    grow_momentum: float = 0.1
    headroom: float = 0.25
    lr: float = 0.05
    init_range: float = 0.01
    seed: int = 0
    kernel: str = "auto"
    live_budget: float = 0.0
    importance_power: float = 0.5
    sketch_width: int = 1 << 16
    sketch_depth: int = 2

    @property
    def dim(self) -> int:
        return self.chunk_dim * self.num_chunks

    def pool_dims(self) -> tuple[int, ...]:
        return tuple(c * self.chunk_dim for c in self.pool_chunks)


# TrainerConfig.fiited: every FiitedConfig field, optional; None = derived from the trainer (chunks making up
# embedding_dim, the default pool widths that fit, lr = lr_sparse) or the field's default (see
# embedding_store.config.trainer_config). Made from FiitedConfig's fields so the two never disagree.
FiitedOverrides = msgspec.defstruct(
    "FiitedOverrides", [(f.name, Optional[t], None) for f, t in zip(dataclasses.fields(FiitedConfig),
                                                                   get_type_hints(FiitedConfig).values())],
    frozen=True, forbid_unknown_fields=True, omit_defaults=True, module=__name__)


AD_ID_FEATURES = ("hash", "sid", "sid_ngram", "hash+sid_ngram")  # TrainerConfig.ad_id_features
PRECISIONS = ("fp32", "auto", "bf16", "fp8")  # TrainerConfig.precision (trainer/precision.py)


class TrainerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    batch_size: int = 512
    lr_dense: float = 1e-3
    lr_sparse: float = 0.05
    embedding_dim: int = 16
    hash_buckets: int = 100_000  # rows per sparse feature table
    cat_slots: int = 4  # extra categorical slots taken from Impression.cat
    dense_dim: int = 8  # dense features taken from Impression.dense (padded/truncated)
    history_len: int = 8
    checkpoint_dir: str = "var/checkpoints"
    checkpoint_every_s: float = 30.0
    checkpoint_every_examples: int = 50_000
    device: str = "auto"  # auto | cpu | cuda
    backend: str = "auto"  # auto | fbgemm | torch | fiited  (sparse embedding kernels)
    seed: int = 0
    # FIITED store knobs when backend = fiited, e.g. {"budget": 0.3}; STREAMREC_TRAINER__FIITED__BUDGET=0.3
    fiited: FiitedOverrides = FiitedOverrides()
    # User model (trainer/users/service.py): its vectors [u, u * v_ad] join the ranker's dense input, and the
    # user-vector index is written to <data_dir>/users/index at every checkpoint (`streamrec users`)
    user_model: bool = True
    user_dim: int = 32
    # a user unseen for this many seconds of event time leaves the user-vector index, the view and the
    # histories (0: never), except the user_ttl_keep most active users (the floor: a quiet stream that
    # resumes after a gap does not empty the index); trainer/users/history.py TtlConfig
    user_ttl_s: float = 7 * 86_400.0
    user_ttl_keep: int = 10_000
    export_dir: str = ""  # "" = no serving export; else a versioned export (trainer/export.py) per checkpoint
    export_keep: int = 5  # export versions kept
    # Continuous publishing for serving (trainer/publish.py): every publish_every_s a new model version under
    # publish_dir ("" = none): a delta (embedding rows touched since the previous version + all dense
    # parameters), a full snapshot every publish_full_every versions; publish_keep_full full chains kept
    publish_dir: str = ""
    publish_every_s: float = 5.0
    publish_full_every: int = 20
    publish_keep_full: int = 3
    # Model variants (serving.arms): the arm this trainer is; its predictions carry it. learn_from: "all"
    # logged traffic (every impression, whichever arm served it) or "own" (only impressions its arm served)
    arm: str = "main"
    learn_from: str = "all"
    # Foundation-model transfer (docs/transfer.md). role: "ranker" (today's single model), "fm" (the large
    # teacher: publishes its predictions to topics.teacher_predictions and its embeddings to topics.fm_embeddings)
    # or "vm" (a small vertical student reading topics.examples_distilled). vm_domains: the domains a VM serves
    # (empty: all). teacher_weight > 0: distill from the FM's predictions, through an auxiliary head
    # (aux_head; False: on the serving head itself) and a student adapter (student_adapter). loopfm: the FM's
    # user/ad embeddings (no older than loopfm_max_age_s) as input features.
    role: str = "ranker"
    vm_domains: tuple[str, ...] = ()
    teacher_weight: float = 0.0
    aux_head: bool = True
    student_adapter: bool = True
    loopfm: bool = False
    loopfm_max_age_s: float = 3600.0
    # LoopFM (trainer/loopfm.py): the width of the FM's published vectors (an FM publishes embedding_dim +
    # user_dim with its user model on, embedding_dim without; a VM refuses records of another width), and how
    # often an FM publishes the users and ads it trained on since (0: after every batch)
    loopfm_dim: int = 48
    loopfm_publish_every_s: float = 1.0
    # SOLARIS (trainer/solaris.py): a VM reads the precompute service's cached FM pair predictions (user, ad)
    # as input features; a cached entry older than solaris_max_age_s counts as a miss
    solaris: bool = False
    solaris_max_age_s: float = 600.0
    # Multi-task early-stage ranker (trainer/early_stage.py): a two-tower model trained beside this ranker on the
    # same examples, on clicks, conversions and this ranker's own scores (early_stage_tasks "multi"; "click": the
    # single-task baseline); checkpointed and published with every model version, so `streamrec serve` can run
    # the cascade (serving.cascade_k). Sizes: embedding rows per table and their width, the towers' hidden width,
    # the towers' output width per head; early_stage_distill weighs the squared error on this ranker's logits
    early_stage: bool = False
    early_stage_tasks: str = "multi"
    early_stage_buckets: int = 20_000
    early_stage_emb_dim: int = 8
    early_stage_hidden: int = 64
    early_stage_dim: int = 16
    early_stage_distill: float = 1.0
    # multi-task: per example, this many (user, ad) candidate pairs (ads drawn from the early_stage_pool most
    # recent distinct ads) scored by this ranker and learned from (the cascade's candidates are not the shown ads)
    early_stage_pairs: int = 4
    early_stage_pool: int = 10_000
    # the early stage's embedding rows learn at their own rate: they must follow a moving final ranker (bench
    # cascade --quick, seeds 0/1: multi-task recall 0.916/0.892 at lr_sparse's 0.05, 0.961/0.936 at 0.15; the
    # single-task baseline 0.595/0.770 and 0.741/0.769; 0.5 lifted multi-task further but cost single-task)
    early_stage_lr_sparse: float = 0.15
    # Semantic IDs (embedding_store/semantic_ids.py, docs/coldstart.md): how the ad id becomes sparse features.
    # "hash": the raw id, randomly hashed; "sid": the ad's full semantic ID (one token); "sid_ngram": its prefix
    # n-gram tokens (sid_levels of them, in the ad_id bag); "hash+sid_ngram": the raw id and, in a table of its
    # own (ad_sid), the prefix tokens. Codes: sid_levels levels of sid_codes k-means centroids over the ads'
    # content (topics.ads AdCreative records); an ad without content yet falls back to its hashed raw id
    ad_id_features: str = "hash"
    sid_levels: int = 3
    sid_codes: int = 16
    # or the ad's semantic ID is a category path the impressions carry (public formats without creatives),
    # coarse to fine, by feature name: Taobao ("cat_1", "cat_2") = (cate_id, brand); Ali-CCP ("cat_0",
    # "campaign_id") = (category 206, brand 216). Empty: codes from content (topics.ads)
    sid_path: tuple[str, ...] = ()
    # C2AL (trainer/cohorts.py): cohort-contrastive auxiliary heads on the shared representation, one per
    # targeted cohort pattern over "domain/activity/country" (e.g. "*/*/br", "display/new/*"); each learns the
    # label "clicked and in the cohort" at weight c2al_weight. Training only: exports never hold them
    c2al: bool = False
    c2al_cohorts: tuple[str, ...] = ()
    c2al_weight: float = 0.1
    # LoKA FP8 (trainer/precision.py, docs/gpu.md): the dense layers' matmul precision. "fp32" (default: nothing
    # attached), "bf16", "fp8" (every layer the Mods allow in fp8 with row-wise scales), "auto" (per layer the
    # fastest kernel whose probed relative GEMM error stays within precision_bound); the probe samples one step
    # in precision_probe_every. On CPU fp8/bf16 are emulated (torch's float8 dtypes, cast and back)
    precision: str = "fp32"
    precision_bound: float = 0.02
    precision_probe_every: int = 50
    # 0 = as fast as it can; > 0 caps the examples trained per second (averaged from the trainer's start): a
    # deliberately slow trainer, to see backpressure (lag grows, the training_backlog alert fires, memory stays
    # bounded) or to leave cores to other work
    max_examples_per_s: float = 0.0

    def __post_init__(self):
        if not ARM_NAME.fullmatch(self.arm):
            raise ConfigError(f"trainer.arm {self.arm!r}: {ARM_NAME_RULE}")
        if self.learn_from not in LEARN_FROM:
            raise ConfigError(f"trainer.learn_from {self.learn_from!r}: must be one of {', '.join(LEARN_FROM)}")
        if self.early_stage_tasks not in ("multi", "click"):
            raise ConfigError(f"trainer.early_stage_tasks {self.early_stage_tasks!r}: must be multi or click")
        if self.ad_id_features not in AD_ID_FEATURES:
            raise ConfigError(f"trainer.ad_id_features {self.ad_id_features!r}: must be one of "
                              f"{', '.join(AD_ID_FEATURES)}")
        if not (1 <= self.sid_levels <= 4 and 2 <= self.sid_codes <= 4096):
            raise ConfigError(f"trainer.sid_levels {self.sid_levels} / sid_codes {self.sid_codes}: levels 1-4, "
                              "codes 2-4096")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"trainer.precision {self.precision!r}: must be one of {', '.join(PRECISIONS)}")
        if not (self.precision_bound > 0 and self.precision_probe_every >= 1):
            raise ConfigError(f"trainer.precision_bound {self.precision_bound} must be > 0 and "
                              f"trainer.precision_probe_every {self.precision_probe_every} >= 1")
        if self.c2al and not self.c2al_cohorts:
            raise ConfigError("trainer.c2al: name the targeted cohorts in trainer.c2al_cohorts (patterns over "
                              "domain/activity/country, e.g. ['*/*/br']; `streamrec bench cohorts` shows how to "
                              "pick them)")


class DistillConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The teacher join (streams/flows/distill.py): examples wait for the FM's prediction at most
    ``teacher_wait_s`` (wall clock) and go on without one past it (counted); at most ``max_pending`` wait."""

    teacher_wait_s: float = 30.0
    max_pending: int = 1_000_000
    recovery_dir: str = ""


class SolarisConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The SOLARIS precompute service (trainer/solaris.py, ``streamrec precompute``): which (user, ad) pairs it
    predicts will be requested soon, how many it may compute per request seen (``budget``), how long a cached
    pair lives (``ttl_s``)."""

    ttl_s: float = 600.0
    budget: float = 2.0  # pairs precomputed per request (impression) seen, at most
    recent_ads: int = 8  # per user: the ads of their latest impressions
    neighbours: int = 4  # per user: nearest users in the FAISS user index whose recent ads are candidates
    domain_candidates: int = 8  # per user: the most shown ads of the user's domains
    max_entries: int = 2_000_000  # cache bound (least recently written leave first)


class MetricsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    clickhouse_url: str = ""  # empty: chDB under <data_dir>/chdb; or http://user:pass@host:8123
    database: str = "streamrec"
    # a ClickHouse cluster's name (remote_servers): Replicated*MergeTree + Distributed tables ON CLUSTER
    # (dashboards/store.py); "" = one node
    cluster: str = ""


class AlertOverride(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An operator's change to one alert rule (``dashboard.alerts.<rule id>``); unset fields keep the rule's."""

    threshold: float | None = None
    window_s: int | None = None

    def __post_init__(self):
        if self.window_s is not None and self.window_s < 10:
            raise ConfigError(f"dashboard.alerts: window_s {self.window_s} must be at least 10 (seconds)")


class DashboardConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 8050
    refresh_s: float = 2.0
    window_minutes: int = 60
    alerts: dict[str, AlertOverride] = {}  # rule id -> threshold / window_s (dashboards/alerts.py RULES)


class ArmConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One model variant: its own trainer (``trainer``: TrainerConfig overrides, e.g. ``{"lr_dense": 3e-3}``),
    its own published versions (``<serving.models_dir>/<name>``), a share of users (hashed user id) or
    ``shadow`` (scores every request, serves nothing), and which traffic it learns from (``all`` | ``own``)."""

    name: str
    share: float = 0.0
    shadow: bool = False
    learn_from: str = "all"
    trainer: dict[str, Any] = {}

    def __post_init__(self):
        where = f"serving.arms: arm {self.name!r}"
        if not ARM_NAME.fullmatch(self.name):
            raise ConfigError(f"{where}: the name must be {ARM_NAME_RULE}")
        if not 0.0 <= self.share <= 1.0:
            raise ConfigError(f"{where}: share {self.share} must be in [0, 1]")
        if self.learn_from not in LEARN_FROM:
            raise ConfigError(f"{where}: learn_from {self.learn_from!r} must be one of {', '.join(LEARN_FROM)}")
        if self.shadow and self.learn_from == "own":
            raise ConfigError(f"{where}: a shadow arm serves nothing, so it has no traffic of its own to learn "
                              "from: use learn_from all")
        for field in ("arm", "learn_from"):
            if field in self.trainer:
                raise ConfigError(f"{where}: trainer.{field} is set by the arm (its name, its learn_from), "
                                  "not by its trainer overrides")
        for field in self.trainer:
            if field not in TrainerConfig.__struct_fields__:
                raise ConfigError(f"{where}: trainer.{field} is not a trainer setting (known: "
                                  f"{', '.join(TrainerConfig.__struct_fields__)})")
        try:
            msgspec.convert(dict(self.trainer), TrainerConfig, strict=False)
        except (msgspec.ValidationError, ConfigError) as e:
            raise ConfigError(f"{where}: trainer overrides: {e}") from None


class ServingConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"  # the ranking service binds to localhost unless configured
    port: int = 8060
    models_dir: str = ""  # "" = <data_dir>/models; arm A publishes to <models_dir>/A
    max_batch: int = 64  # requests scored in one forward pass at most
    max_wait_ms: float = 2.0  # how long a request may wait for others to share its forward pass
    max_candidates: int = 1000  # longer candidate lists are refused (413)
    retrieve_k: int = 100  # candidates retrieved when a request names none
    poll_s: float = 0.5  # how often the service looks for a newer published version
    emit_impressions: bool = True  # every served ad becomes an impression event (closes the loop)
    # answer a request once the broker acknowledged its impressions: a SIGKILLed service then loses no impression
    # of an answered request (costs the broker's acknowledgement, a few ms per batch). While the broker is away
    # it answers after ack_timeout_ms, then at once until deliveries succeed again (impressions wait in memory)
    ack_impressions: bool = True
    ack_timeout_ms: float = 500.0
    arms: tuple[ArmConfig, ...] = (ArmConfig(name="main", share=1.0),)
    # the cascade (trainer/early_stage.py): with cascade_k > 0 the arm's published early stage ranks a request's
    # candidates and the final ranker scores only its top cascade_k (0: off; versions without one: no cascade)
    cascade_k: int = 0

    def __post_init__(self):
        if not self.arms:
            raise ConfigError("serving.arms: at least one arm is needed")
        names = [a.name for a in self.arms]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"serving.arms: arm names must be unique, {', '.join(map(repr, dup))} repeated")
        live = [a for a in self.arms if not a.shadow]
        total = sum(a.share for a in live)
        if not live or abs(total - 1.0) > SHARE_TOLERANCE:
            shares = ", ".join(f"{a.name}={a.share:g}" for a in live) or "none"
            raise ConfigError(f"serving.arms: the shares of the arms that serve (not shadow) must sum to 1, "
                              f"got {total:g} ({shares})")

    def arm(self, name: str) -> ArmConfig:
        """The arm called ``name`` (KeyError naming the known arms otherwise)."""
        for a in self.arms:
            if a.name == name:
                return a
        raise KeyError(f"no arm {name!r} in serving.arms (known: {', '.join(a.name for a in self.arms)})")


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    data_dir: str = "var"
    kafka: KafkaConfig = KafkaConfig()
    topics: TopicsConfig = TopicsConfig()
    labels: LabelsConfig = LabelsConfig()
    trainer: TrainerConfig = TrainerConfig()
    metrics: MetricsConfig = MetricsConfig()
    dashboard: DashboardConfig = DashboardConfig()
    serving: ServingConfig = ServingConfig()
    distill: DistillConfig = DistillConfig()
    solaris: SolarisConfig = SolarisConfig()

    def models_dir(self) -> str:
        return self.serving.models_dir or str(Path(self.data_dir, "models"))

    def chdb_path(self) -> str:
        return str(Path(self.data_dir, "chdb").resolve())

    def clickhouse_url(self) -> str:
        return self.metrics.clickhouse_url or f"chdb://{self.chdb_path()}"


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, raw in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        path = key[len(ENV_PREFIX):].lower().split("__")
        if path[0] not in Config.__struct_fields__:  # e.g. STREAMREC_CONFIG, STREAMREC_VENV
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"environment variable {key}: cannot parse {raw!r}: {e}") from None
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        merged[k] = _merge(merged[k], v) if isinstance(v, Mapping) and isinstance(merged.get(k), dict) else v
    return merged


def load_config(path: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
                **overrides: Any) -> Config:
    """Defaults <- file (``path`` or ``$STREAMREC_CONFIG``) <- environment <- ``overrides``.

    ``overrides`` are section dicts, e.g. ``load_config(kafka={"bootstrap_servers": "h:9092"})``.
    """
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    path = path or env.get("STREAMREC_CONFIG")
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"config file {path}: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level, got {type(loaded).__name__}")
        data = _merge(data, loaded)
    data = _merge(data, _env_overrides(env))
    data = _merge(data, overrides)
    try:
        return msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as e:
        raise ConfigError(f"configuration: {e}") from None


def _is_default_single_arm(cfg: Config) -> bool:
    return len(cfg.serving.arms) == 1 and cfg.serving.arms[0].name == TrainerConfig().arm


def arm_trainer_config(cfg: Config, arm: ArmConfig | str) -> Config:
    """``cfg`` as the trainer of ``arm`` (an :class:`ArmConfig` or the name of one in ``cfg.serving.arms``) runs
    it: the base ``trainer`` section with the arm's overrides, ``trainer.arm`` = its name, its ``learn_from``,
    its own checkpoints (``<trainer.checkpoint_dir>/<arm>``) and its own published versions
    (``<models_dir>/<arm>``), so several trainers run side by side without sharing a file.

    One arm called ``main`` (the default) keeps ``trainer.checkpoint_dir`` itself: checkpoints written before
    arms existed resume. An arm's overrides may name ``checkpoint_dir`` or ``publish_dir``; they win.

    >>> cfg = replace(Config(), serving={"arms": [{"name": "a", "share": 0.9},
    ...                                           {"name": "b", "share": 0.1, "trainer": {"lr_dense": 0.01}}]})
    >>> b = arm_trainer_config(cfg, "b").trainer
    >>> b.arm, b.lr_dense, b.checkpoint_dir, b.publish_dir
    ('b', 0.01, 'var/checkpoints/b', 'var/models/b')
    >>> arm_trainer_config(Config(), "main").trainer.checkpoint_dir
    'var/checkpoints'
    """
    if isinstance(arm, str):
        arm = cfg.serving.arm(arm)
    tc = msgspec.to_builtins(cfg.trainer)
    ckpt = tc["checkpoint_dir"] if _is_default_single_arm(cfg) else str(Path(tc["checkpoint_dir"], arm.name))
    tc.update(checkpoint_dir=ckpt, publish_dir=str(Path(cfg.models_dir(), arm.name)))
    tc = _merge(tc, arm.trainer)
    tc.update(arm=arm.name, learn_from=arm.learn_from)
    try:
        return replace(cfg, trainer=tc)
    except ConfigError as e:
        raise ConfigError(f"serving.arms: arm {arm.name!r}: {e}") from None


def replace(cfg: Config, **sections: Mapping[str, Any] | Any) -> Config:
    """A copy of ``cfg`` with some fields changed: ``replace(cfg, trainer={"batch_size": 64}, data_dir="x")``."""
    data = _merge(msgspec.to_builtins(cfg), sections)
    try:
        return msgspec.convert(data, Config, strict=False)
    except msgspec.ValidationError as e:
        raise ConfigError(f"configuration: {e}") from None
