"""Event schema: the one module every component imports.

Events are frozen, typed ``msgspec`` structs and travel as JSON. Validation happens once, at the edge
(:func:`decode`), and bad input becomes data: a :class:`DeadLetter` with a reason, never an exception
that stops a dataflow or the trainer.

>>> imp = Impression(event_id="i1", ts=1_700_000_000_000, user_id=7, ad_id=3, campaign_id=1,
...                  advertiser_id=1, domain="feed")
>>> raw = encode(imp)
>>> decode(raw, Impression) == imp
True
>>> bad = decode(b'{"event_id": "i2"}', Impression)
>>> isinstance(bad, Invalid), bad.reason.startswith("schema:")
(True, True)

Timestamps are integer milliseconds since the Unix epoch (event time).
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Literal, TypeVar, Union

import msgspec

# Event structs use gc=False: they never form reference cycles, and untracked objects make decoding
# large batches cheaper (the cyclic GC otherwise scans every held record).

# Known surfaces (domains). Unknown domains are rejected at the edge, so a typo never becomes a new domain.
DOMAINS: tuple[str, ...] = ("feed", "stories", "video", "search", "display")
DOMAIN_INDEX: dict[str, int] = {d: i for i, d in enumerate(DOMAINS)}
DEVICES: tuple[str, ...] = ("ios", "android", "web", "other")
OBJECTIVES: tuple[str, ...] = ("click", "conversion")

# Plausible event-time range: 2000-01-01 .. 2100-01-01. Absurd timestamps go to dead letters.
MIN_TS_MS = 946_684_800_000
MAX_TS_MS = 4_102_444_800_000
MAX_ID = 2**63 - 1
MAX_LIST = 256  # history / categorical slots / dense values per event

Id = Annotated[int, msgspec.Meta(ge=0, le=MAX_ID)]
TsMs = Annotated[int, msgspec.Meta(ge=MIN_TS_MS, le=MAX_TS_MS)]
EventId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
ShortStr = Annotated[str, msgspec.Meta(max_length=32)]


class Impression(msgspec.Struct, frozen=True, gc=False, tag="impression", forbid_unknown_fields=False):
    """An ad shown to a user on one surface.

    ``cat`` holds extra categorical features (already integer ids, e.g. hashed Criteo C1..C26),
    ``dense`` numeric features, ``history`` the user's recent ad ids (most recent last).
    """

    event_id: EventId
    ts: TsMs
    user_id: Id
    ad_id: Id
    campaign_id: Id
    advertiser_id: Id
    domain: ShortStr
    position: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 0
    device: ShortStr = "other"
    country: ShortStr = ""
    cat: Annotated[list[Id], msgspec.Meta(max_length=MAX_LIST)] = []
    dense: Annotated[list[float], msgspec.Meta(max_length=MAX_LIST)] = []
    history: Annotated[list[Id], msgspec.Meta(max_length=MAX_LIST)] = []
    # set when streamrec's ranking service served it: the arm (model variant) and the model version that
    # ranked it ("" / 0: logged traffic from elsewhere)
    arm: ShortStr = ""
    model_version: Annotated[int, msgspec.Meta(ge=0)] = 0


class Click(msgspec.Struct, frozen=True, gc=False, tag="click", forbid_unknown_fields=False):
    event_id: EventId
    impression_id: EventId
    ts: TsMs
    user_id: Id


class Conversion(msgspec.Struct, frozen=True, gc=False, tag="conversion", forbid_unknown_fields=False):
    event_id: EventId
    impression_id: EventId
    ts: TsMs
    user_id: Id
    kind: ShortStr = "purchase"
    value: float = 0.0


END_OF_LOG = "end_of_log"  # Watermark.source of the mark that ends a finite log


class Watermark(msgspec.Struct, frozen=True, gc=False, tag="watermark"):
    """Control record: no event with ``ts`` below this will follow in this partition.

    ``streamrec replay``/``generate`` append one per partition at the end of a finite log with
    ``source=END_OF_LOG``: it closes every attribution window of the log's impressions, but unlike other
    watermarks it does not move the partition's event time, so live traffic after the log is not judged
    stale (a log's end plus the longest window is usually a day in the future).
    """

    ts: TsMs
    source: ShortStr = "replay"


LabelDecision = Literal["window_closed", "end_of_stream", "elapsed", "late_positive"]


class Teacher(msgspec.Struct, frozen=True, gc=False):
    """The foundation model's prediction for one example, as the teacher join attached it."""

    p_click: float
    p_conversion: float
    model_version: int = 0  # the FM's training steps when it scored the example
    scored_ts: int = 0  # wall-clock ms when the FM scored it (its age at training time is the staleness)


class Example(msgspec.Struct, frozen=True, gc=False, tag="example", omit_defaults=True):
    """A labelled training example: an impression with its labels per objective."""

    example_id: str
    impression: Impression
    click: int
    conversion: int
    click_ts: int | None = None
    conversion_ts: int | None = None
    decided: LabelDecision = "window_closed"
    weight: float = 1.0
    emitted_ts: int = 0  # wall-clock ms when the labels dataflow emitted it
    teacher: Teacher | None = None  # the FM's prediction (examples_distilled only; None: none arrived in time)


class DeadLetter(msgspec.Struct, frozen=True, gc=False, tag="dead_letter"):
    """A record that could not be used, with where it came from and why."""

    reason: str
    raw: bytes
    topic: str = ""
    partition: int = -1
    offset: int = -1
    ts: int = 0  # wall-clock ms when it was rejected
    step: str = ""


class PredictionBatch(msgspec.Struct, frozen=True, gc=False, tag="predictions"):
    """Progressive-validation scores of one trainer micro-batch, column-oriented.

    Scores were computed *before* the model trained on these examples.
    """

    model_version: int
    trained_ts: int
    example_ids: list[str]
    domains: list[str]
    event_ts: list[int]
    emitted_ts: list[int]
    p_click: list[float]
    p_conversion: list[float]
    click: list[int]
    conversion: list[int]
    arm: str = ""  # the trainer's arm (TrainerConfig.arm)
    # per example: the arm that served its impression and the published version that ranked it
    # (Impression.arm / .model_version; "" / 0 for logged traffic); empty lists: every example logged
    served_arms: list[str] = []
    served_versions: list[int] = []
    # per example: its cohort "domain/activity/country" (trainer/cohorts.py); empty list: none named
    cohorts: list[str] = []


class TeacherBatch(msgspec.Struct, frozen=True, gc=False, tag="teacher"):
    """The FM's predictions for one of its micro-batches (topics.teacher_predictions), column-oriented; scores
    made before the FM trained on these examples, like every PredictionBatch."""

    model_version: int
    scored_ts: int
    example_ids: list[str]
    p_click: list[float]
    p_conversion: list[float]


class FMEmbeddings(msgspec.Struct, frozen=True, gc=False, tag="fm_embeddings"):
    """The FM's intermediate embeddings of some ids (LoopFM), ``kind`` user | ad | pair, one row per id
    (``vectors`` is ``len(ids) x dim``, flattened row-major); pairs are keyed ``user_id * 2**32 + ad_id``."""

    kind: ShortStr
    model_version: int
    ts: int  # wall-clock ms when the FM computed them
    dim: int
    ids: list[int]
    vectors: list[float]


class AdCreative(msgspec.Struct, frozen=True, gc=False, tag="ad_creative"):
    """An ad's creative at its birth (``topics.ads``, keyed by ad id): ``content``, the embedding a text/image
    encoder gives it, and its ``category`` path (coarse to fine). The trainer codes the ad's semantic ID from it
    (embedding_store/semantic_ids.py) before its impressions arrive."""

    ad_id: int
    ts: int  # event-time ms of the ad's birth
    content: list[float]
    category: list[int] = []
class SolarisPairs(msgspec.Struct, frozen=True, gc=False, tag="solaris_pairs"):
    """The SOLARIS precompute service's FM predictions for some (user, ad) pairs (topics.solaris_pairs),
    column-oriented: row ``i`` is the pair ``(user_ids[i], ad_ids[i])``, its click probability and its
    conversion probability (click and conversion, like :class:`Teacher`) as the FM with ``model_version``
    predicted them at ``ts`` (wall-clock ms); see trainer/solaris.py."""

    model_version: int
    ts: int
    user_ids: list[int]
    ad_ids: list[int]
    p_click: list[float]
    p_conversion: list[float]


class ServiceStats(msgspec.Struct, frozen=True, gc=False, tag="service_stats"):
    """A component's counters and gauges at one moment (``values`` name -> number)."""

    component: str
    ts: int
    values: dict[str, float]
    instance: str = ""


Event = Union[Impression, Click, Conversion]
Record = Union[Impression, Click, Conversion, Watermark]
T = TypeVar("T")


class Invalid(msgspec.Struct, frozen=True):
    """The result of decoding bad input: why it was rejected."""

    reason: str


_encoder = msgspec.json.Encoder()
# Everything msgspec may raise on hostile bytes: its own errors (ValidationError is a DecodeError), the
# UnicodeDecodeError it raises for invalid UTF-8 inside a key or string, and RecursionError for deep nesting
# (`[[[[...` a few thousand levels down). Every decode of input bytes catches this tuple, so no record can
# escape as an exception and stop a dataflow.
DECODE_ERRORS: tuple[type[Exception], ...] = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)
# keyed by id(kind): hashing a typing.Union costs ~4 us a call; the entry keeps ``kind`` alive and is checked
_decoders: dict[int, tuple[object, msgspec.json.Decoder]] = {}


def encode(obj: msgspec.Struct) -> bytes:
    """JSON bytes of one struct (with its ``type`` tag)."""
    return _encoder.encode(obj)


def _decoder(kind: object) -> msgspec.json.Decoder:
    entry = _decoders.get(id(kind))
    if entry is None or entry[0] is not kind:
        entry = _decoders[id(kind)] = (kind, msgspec.json.Decoder(kind))
    return entry[1]


# Ids and short strings are tokens: no whitespace, quotes, angle brackets, semicolons, backslashes or control
# characters, so no value can read as SQL, HTML or markup in a system downstream that forgets to escape it.
# One regex over the fields joined (~0.2 us an event) instead of a msgspec pattern per field (~0.3 us each).
TOKEN_PUNCT = "_.:#/@+=~-"  # "-" last: literal inside a regex character class
TOKEN_CHARS = "A-Za-z0-9" + TOKEN_PUNCT
tokens_ok = re.compile(f"[{TOKEN_CHARS}]*").fullmatch


def _bad_token(ev: object, names: tuple[str, ...]) -> str:
    bad = [n for n in names if not tokens_ok(getattr(ev, n))]
    return f"{', '.join(bad)}: only letters, digits and {TOKEN_PUNCT} are allowed"


def check(ev: object) -> str | None:
    """Semantic checks beyond the types; returns a reason or ``None`` when the event is fine."""
    if isinstance(ev, Example):
        reason = check(ev.impression)
        return f"impression: {reason}" if reason else None
    if isinstance(ev, Impression):
        if ev.domain not in DOMAIN_INDEX:
            return f"unknown domain {ev.domain!r} (known: {', '.join(DOMAINS)})"
        if not tokens_ok(ev.event_id + ev.device + ev.country + ev.arm):
            return _bad_token(ev, ("event_id", "device", "country", "arm"))
        if not all(map(math.isfinite, ev.dense)):
            return "dense feature is NaN or infinite"
    elif isinstance(ev, Click):
        if not tokens_ok(ev.event_id + ev.impression_id):
            return _bad_token(ev, ("event_id", "impression_id"))
        if ev.impression_id == ev.event_id:
            return "feedback event refers to itself as its impression"
    elif isinstance(ev, FeatureStats):
        return _check_feature_stats(ev)
    elif isinstance(ev, AdCreative):
        if not 0 <= ev.ad_id < 2 ** 63:
            return f"ad_id {ev.ad_id} outside [0, 2**63)"
        if not ev.content or len(ev.content) > MAX_LIST:
            return f"content: {len(ev.content)} values (1..{MAX_LIST})"
        if not all(map(math.isfinite, ev.content)):
            return "content is NaN or infinite"
    elif isinstance(ev, Conversion):
        if not tokens_ok(ev.event_id + ev.impression_id + ev.kind):
            return _bad_token(ev, ("event_id", "impression_id", "kind"))
        if ev.impression_id == ev.event_id:
            return "feedback event refers to itself as its impression"
    return None


def decode(raw: bytes, kind: type[T] | object = Record) -> T | Invalid:
    """Decode and validate one message; never raises on bad input.

    ``kind`` is a struct type or a Union of tagged structs (default: any input record).
    """
    try:
        ev = _decoder(kind).decode(raw)
    except msgspec.ValidationError as e:
        return Invalid(f"schema: {e}")
    except DECODE_ERRORS as e:
        return Invalid(unparseable(e))
    reason = check(ev)
    return Invalid(f"invalid: {reason}") if reason else ev


def unparseable(e: Exception) -> str:
    """The dead-letter reason for bytes that are not a JSON record (see :data:`DECODE_ERRORS`)."""
    if isinstance(e, RecursionError):
        return "unparseable: nested too deeply"
    if isinstance(e, UnicodeDecodeError):
        return "unparseable: invalid UTF-8 inside a string"
    return f"unparseable: {e}"


def dead_letter(reason: str, raw: bytes, *, topic: str = "", partition: int = -1, offset: int = -1,
                ts: int = 0, step: str = "") -> DeadLetter:
    """Build a dead letter; keeps at most 64 KiB of the raw bytes so huge inputs stay bounded."""
    return DeadLetter(reason=reason[:1000], raw=raw[:65536], topic=topic, partition=partition,
                      offset=offset, ts=ts, step=step)


def user_key(ev: Impression | Click | Conversion) -> bytes:
    """Kafka key: the user id, so an impression and its feedback share a partition."""
    return str(ev.user_id).encode()


FeatureKind = Literal["count", "histogram", "heavy_hitters"]
FEATURE_QUANTILES: tuple[float, ...] = (0.5, 0.9, 0.99)  # the levels of FeatureStats.quantiles
MAX_BINS = 512
# label-delay histograms of the stats flow (delay.click, delay.conversion): inner bucket edges in seconds
DELAY_EDGES_S: tuple[float, ...] = (1, 5, 15, 30, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600,
                                    24 * 3600, 3 * 86400, 7 * 86400, 30 * 86400)
Count = Annotated[int, msgspec.Meta(ge=0)]
FeatureName = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


def bin_labels(edges) -> list[str]:
    """Histogram bucket labels: each bucket's lower edge (``-inf`` for the first), ``len(edges) + 1`` of them.

    >>> bin_labels([1, 5.0, 2592000])
    ['-inf', '1', '5', '2592000']
    """
    return ["-inf", *(f"{float(e):.12g}" for e in edges)]


class FeatureStats(msgspec.Struct, frozen=True, tag="feature_stats", gc=False):
    """Statistics of one feature over one event-time window, domain and input partition (stats dataflow).

    ``stats_id`` = ``"<window_start>:<domain>:<feature>:p<partition>"`` is deterministic, so a replay after a
    crash rewrites the same rows (idempotent sink); ``instance`` = ``"p<partition>"``: partitions are partial
    aggregates (sum counts and histograms, merge heavy hitters, over instances). ``emitted_ts``: wall-clock ms
    when the flow closed the window (the dashboards' time axis, as training time is for predictions).

    ``kind``:

    * ``count``: ``count`` events, ``value`` = ``count`` over the window's examples (a label rate);
    * ``histogram``: ``count`` values in buckets ``counts[i]`` labelled ``bins[i]`` by their lower edge
      (``"-inf"`` first; ``edges`` are the inner edges, :func:`bin_labels`), ``missing`` examples without the
      feature, exact ``mean``, ``std`` (population: partials combine exactly), ``min``, ``max``, and
      ``quantiles`` at :data:`FEATURE_QUANTILES` interpolated inside their bucket;
    * ``heavy_hitters``: Misra-Gries ``items`` with lower-bound ``item_counts`` (``count`` = their sum).

    Validated by :func:`check` (finite numbers, matching lengths, counts summing to ``count``).
    """

    stats_id: EventId
    window_start: TsMs  # ms, event time of the impressions
    window_end: TsMs
    domain: ShortStr
    feature: FeatureName
    kind: FeatureKind
    partition: Annotated[int, msgspec.Meta(ge=0)]
    instance: ShortStr
    count: Count
    emitted_ts: TsMs
    missing: Count = 0
    value: float = 0.0
    mean: float | None = None
    std: float | None = None
    min: float | None = None
    max: float | None = None
    bins: Annotated[list[Annotated[str, msgspec.Meta(max_length=32)]], msgspec.Meta(max_length=MAX_BINS)] = []
    edges: Annotated[list[float], msgspec.Meta(max_length=MAX_BINS)] = []
    counts: Annotated[list[Count], msgspec.Meta(max_length=MAX_BINS)] = []
    quantiles: Annotated[list[float], msgspec.Meta(max_length=len(FEATURE_QUANTILES))] = []
    items: Annotated[list[Id], msgspec.Meta(max_length=MAX_BINS)] = []
    item_counts: Annotated[list[Count], msgspec.Meta(max_length=MAX_BINS)] = []


def _check_feature_stats(s: FeatureStats) -> str | None:
    if s.domain not in DOMAIN_INDEX:
        return f"unknown domain {s.domain!r} (known: {', '.join(DOMAINS)})"
    if not tokens_ok(s.stats_id + s.feature + s.instance):
        return _bad_token(s, ("stats_id", "feature", "instance"))
    if s.window_start > s.window_end:
        return f"window_start {s.window_start} is after window_end {s.window_end}"
    numbers = [s.value, *s.edges, *s.quantiles, *(v for v in (s.mean, s.std, s.min, s.max) if v is not None)]
    if not all(map(math.isfinite, numbers)):
        return "a statistic is NaN or infinite"
    if s.std is not None and s.std < 0:
        return f"std {s.std} is negative"
    if s.min is not None and s.max is not None and s.min > s.max:
        return f"min {s.min} is above max {s.max}"
    if len(s.bins) != len(s.counts) or (s.edges and len(s.edges) + 1 != len(s.bins)):
        return (f"histogram: {len(s.bins)} bins, {len(s.counts)} counts and {len(s.edges)} edges "
                "(expected equal bins and counts, edges one fewer)")
    if any(a >= b for a, b in zip(s.edges, s.edges[1:])):
        return "histogram: edges are not increasing"
    if s.kind == "histogram" and sum(s.counts) != s.count:
        return f"histogram: counts sum to {sum(s.counts)}, count is {s.count}"
    if s.quantiles and len(s.quantiles) != len(FEATURE_QUANTILES):
        return f"quantiles: expected {len(FEATURE_QUANTILES)} (at {FEATURE_QUANTILES}), got {len(s.quantiles)}"
    if len(s.items) != len(s.item_counts):
        return f"heavy hitters: {len(s.items)} items but {len(s.item_counts)} counts"
    return None
