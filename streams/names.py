"""One namespace for the names components publish and dashboards read: components, dead-letter steps, the
counters and gauges of ``ServiceStats`` and the features of the stats flow's ``FeatureStats``.

Producers write them, the SQL of :mod:`dashboards.queries` and :mod:`dashboards.alerts` reads them, tests
check them; a name spelt differently in two places would be a panel that stays empty. Members are ``str``
(``StrEnum``), so they serve as dict keys, JSON and SQL literals as they are.

>>> Component.TRAINER == "trainer", f"{Stat.EXAMPLES_TRAINED}"
(True, 'examples_trained')
>>> Step.LABELS_JOIN  # the Bytewax step's full id: flow "labels", step "join"
<Step.LABELS_JOIN: 'labels.join'>
"""

from __future__ import annotations

from enum import StrEnum


class Component(StrEnum):
    """``ServiceStats.component``: who reports."""

    REPLAY = "replay"  # streamrec replay / generate / up's producer (one report stream per run)
    LABELS = "labels"
    STATS = "stats"
    TRAINER = "trainer"
    SUPERVISOR = "supervisor"
    SERVING = "serving"  # streamrec serve (serving/)
    AUDIENCE = "audience"  # the simulated audience's driver (deploy/audience.py)
    DISTILL = "distill"  # the teacher join (streams/flows/distill.py)
    SOLARIS = "solaris"  # the SOLARIS precompute service (trainer/solaris.py, streamrec precompute)


class Step(StrEnum):
    """``DeadLetter.step``: who refused a record (Bytewax steps by their full id ``flow.step``)."""

    REPLAY = "replay"  # a log line that is no record
    LABELS_JOIN = "labels.join"  # everything the labels flow refuses (the reason's category says why)
    TRAINER_DECODE = "trainer.decode"
    DISTILL_JOIN = "distill.join"  # bad teacher records and undecodable examples (the reason says which)
    METRICS_SINK = "metrics_sink"
    SOLARIS_CACHE = "solaris.cache"  # a VM's pair cache: bad SolarisPairs records (trainer/solaris.py)


class Stat(StrEnum):
    """Counters (monotonic within a process, restored from checkpoints) and gauges of ``ServiceStats``."""

    # replay
    EVENTS_PRODUCED = "events_produced"
    BAD_RECORDS = "bad_records"
    LAST_EVENT_TS = "last_event_ts"
    IMPRESSIONS = "impressions"
    CLICKS = "clicks"
    CONVERSIONS = "conversions"
    # labels
    EVENTS_IN = "events_in"
    EXAMPLES_OUT = "examples_out"
    FEEDBACK_JOINED = "feedback_joined"
    LATE_POSITIVES = "late_positives"
    PENDING_IMPRESSIONS = "pending_impressions"  # gauge
    # gauges of the join's state (streams/flows/join.py, docs/joinstate.md): bytes in memory (estimate), bytes of
    # the cold tier on disk, impressions compacted to the cold tier whose window is open
    JOIN_STATE_MEMORY_BYTES = "join_state_memory_bytes"
    JOIN_STATE_DISK_BYTES = "join_state_disk_bytes"
    JOIN_COMPACTED = "join_compacted_impressions"
    DEAD_PREFIX = "dead."  # + the reason's category: dead letters of each kind
    # stats flow
    EXAMPLES_IN = "examples_in"
    INVALID_EXAMPLES = "invalid"
    TOO_LATE = "too_late"  # examples of windows already closed
    RECORDS_OUT = "records_out"
    OPEN_WINDOWS = "open_windows"  # gauge
    # distill flow (the teacher join; examples_in, examples_out, duplicates, dead_letters as above)
    EXAMPLES_WITH_TEACHER = "examples_with_teacher"
    EXAMPLES_WITHOUT_TEACHER = "examples_without_teacher"  # left at the deadline, the bound or end of input
    TEACHER_COVERAGE = "teacher_coverage"  # with / out, over the flow's life
    LOOPFM_AGE_P50_S = "loopfm_age_p50_s"  # a VM's LoopFM store: median age of the FM vectors it read (hits)
    TEACHER_AGE_P50_MS = "teacher_age_p50_ms"  # of the interval: leaving time - the teacher's scored_ts
    TEACHER_WAIT_P50_MS = "teacher_wait_p50_ms"  # of the interval: how long examples waited at the join
    TEACHERS_IN = "teachers_in"  # rows of valid TeacherBatch records
    TEACHERS_LATE = "teachers_late"  # their example had left: dropped, never applied
    TEACHERS_DUPLICATE = "teachers_duplicate"  # a second copy while the first waited
    TEACHERS_EXPIRED = "teachers_expired"  # waited for their example past the wait or the bound
    PENDING_EVICTED = "pending_evicted"  # examples sent on without teacher by distill.max_pending
    PENDING_EXAMPLES = "pending_examples"  # gauge: examples waiting for their teacher
    PENDING_TEACHERS = "pending_teachers"  # gauge: teachers waiting for their example
    # SOLARIS (trainer/solaris.py): the precompute service's, and a VM's pair cache (its hit rate and age too)
    SOLARIS_HIT_RATE = "solaris_hit_rate"  # requests whose pair was in the cache (fresh) / requests
    SOLARIS_AGE_P50_S = "solaris_age_p50_s"  # median age of the cached predictions that were hits
    SOLARIS_BUDGET_USED = "solaris_budget_used"  # pairs computed / requests seen (<= solaris.budget)
    SOLARIS_PAIRS_COMPUTED = "solaris_pairs_computed"
    SOLARIS_REQUESTS = "solaris_requests"
    # trainer
    TEACHERS_PUBLISHED = "teachers_published"  # an FM's: predictions published to topics.teacher_predictions
    EXAMPLES_TRAINED = "examples_trained"
    STEPS = "steps"
    DUPLICATES = "duplicates"
    EXAMPLES_OTHER_ARM = "examples_other_arm"  # learn_from own: scored, not trained (another arm served them)
    EXAMPLES_OTHER_DOMAIN = "examples_other_domain"  # a VM's: examples outside trainer.vm_domains, skipped
    CHECKPOINTS = "checkpoints"
    MODEL_VERSION = "model_version"
    LAG_MS = "lag_ms"
    FRESHNESS_MS = "freshness_ms"
    USER_VECTORS = "user_vectors"
    USER_FRESHNESS_P50_MS = "user_freshness_p50_ms"
    USER_FRESHNESS_P99_MS = "user_freshness_p99_ms"
    FIITED_POOL_BYTES_PREFIX = "fiited_pool_bytes_d"  # + the pool's width
    FIITED_ROWS_PREFIX = "fiited_rows_d"
    # every embedding backend (SparseEmbeddings.memory_report): fixed tables report their one width
    EMBEDDING_BYTES_PREFIX = "embedding_bytes_d"  # + the row width: bytes of rows of that width (+ optimizer state)
    EMBEDDING_ROWS_PREFIX = "embedding_rows_d"  # + the row width: rows held at that width
    # serving (serving/emit.py)
    REQUESTS = "requests"  # /rank requests answered, any status
    ERRORS = "errors"  # of them answered 4xx/5xx
    ERRORS_PREFIX = "errors."  # + the status: answers with that status
    QPS = "qps"  # requests per second over the interval
    LATENCY_P50_MS = "latency_p50_ms"  # of the interval's 200 answers, from the body read to the answer
    LATENCY_P99_MS = "latency_p99_ms"
    BATCHES = "batches"  # scoring batches run
    BATCH_SIZE_MEAN = "batch_size_mean"  # requests per batch over the interval
    BATCH_SIZE_MAX = "batch_size_max"
    SHADOW_AGREEMENT_PREFIX = "shadow_agreement."  # + the shadow arm: its top-k overlap with the served top k
    ARM_SEQ_PREFIX = "arm_seq."  # + the arm: the model version it serves
    ARM_MODEL_AGE_PREFIX = "arm_model_age_s."  # + the arm: now - the served version's trained_ts
    ARM_REFUSED_PREFIX = "arm_refused."  # + the arm: new versions refused (the previous one kept serving)
    IMPRESSIONS_EMITTED = "impressions_emitted"
    IMPRESSIONS_PENDING = "impressions_pending"  # handed over but not yet delivered to the broker
    IMPRESSIONS_UNACKED = "impressions_unacked"  # of requests answered before the broker acknowledged them
    IMPRESSIONS_DROPPED = "impressions_dropped"  # over serving's in-memory bound while the broker was away
    CATALOGUE_ADS = "catalogue_ads"
    # continuous publishing (trainer/publish.py), gauges of the newest version
    PUBLISHED_SEQ = "published_seq"  # its seq
    PUBLISH_BYTES = "publish_bytes"  # its size (all files)
    PUBLISH_S = "publish_s"  # seconds to write it (the trainer pauses meanwhile)
    DELTA_FRACTION = "delta_fraction"  # its size / the size of the full snapshot it builds on (1 for a full)
    # the early-stage ranker trained beside the trainer's model (trainer/early_stage.py, trainer.early_stage)
    EARLY_STAGE_ROWS = "early_stage_rows"  # examples it trained on (total)
    EARLY_STAGE_PAIR_ROWS = "early_stage_pair_rows"  # candidate pairs the final scored for it (total)
    EARLY_STAGE_LABEL_LOSS = "early_stage_label_loss"  # mean label loss since the previous report
    EARLY_STAGE_DISTILL_LOSS = "early_stage_distill_loss"  # mean loss on the final's scores since then
    # shared
    DEAD_LETTERS = "dead_letters"
    EVENTS_PER_S = "events_per_s"
    EXAMPLES_PER_S = "examples_per_s"
    # supervisor, + "." + the process name
    UP = "up"
    RESTARTS = "restarts"
    CRASH_LOOPING = "crash_looping"
    # audience (deploy/audience.py): totals, and per arm + "." + the arm (CLICKS and CONVERSIONS too); it also
    # reports REQUESTS and LATENCY_P50_MS / LATENCY_P99_MS as it saw them
    SERVED = "served"  # ads served (impressions)
    TRUE_P_CLICK = "true_p_click"  # the oracle: mean true p_click of the served ads (at their positions)
    TRUE_P_CONVERSION = "true_p_conversion"  # mean true post-click conversion probability of the served ads
    REQUEST_ERRORS = "request_errors"  # + "." + the HTTP status ("conn": no answer)
    PENDING_FEEDBACK = "pending_feedback"  # gauge: clicks and conversions not yet due


class Feature(StrEnum):
    """``FeatureStats.feature`` of the stats flow (streams/flows/stats.py), per window, domain and partition."""

    COUNT = "count"  # examples in the window
    LABEL_CLICK = "label.click"  # positives; value = rate
    LABEL_CONVERSION = "label.conversion"
    LATE_POSITIVE = "late_positive"  # ES-DFM corrections, in the window of their label's time
    DELAY_CLICK = "delay.click"  # histogram of click time minus impression time, seconds
    DELAY_CONVERSION = "delay.conversion"  # conversion time minus impression time
    DENSE_PREFIX = "dense."  # + the dense feature's index: histogram, moments, quantiles
    HH_PREFIX = "hh."  # + the sparse field: heavy hitters
