"""Decide where every line of a block of native log lines goes: the CPU-heavy half of ``streamrec replay``
(decode, validate, route), kept apart from producing so it can run in a worker process
(:mod:`streams.sources.decode_worker`) while the parent only produces (:meth:`streams.sources.replay.Publisher.send_plan`).

A :class:`Plan` describes one block of ``L`` lines with ``E`` good events and ``W`` watermarks in it.
Its verdicts are exactly those of ``schema.decode`` (decode + ``schema.check``): a line is a good event,
a watermark, blank, or failed (with ``schema.decode``'s reason).

Two ways to reach them:

* the fast path decodes each line into :data:`FastRecord`, where an impression's list fields (``cat``,
  ``dense``, ``history``) stay raw JSON (msgspec still checks their syntax) and are validated in bulk, a few
  C passes over the block's joined lists: only digits (ids) or digits, minus and dot (floats: no exponent,
  hence finite), flat arrays, no digit run longer than the bound allows, at most ``max_length`` elements.
  It accepts a block only when every line passes, and only under conditions that prove ``schema.decode``
  would accept every line too (see :func:`_fast_block`). Materialising the lists was ~40% of the decoding
  time, and a block of decoded Impressions costs GC passes (their lists are tracked objects);
* otherwise each line goes through ``schema``'s own decoder and ``schema.check`` (the reference).

>>> from streams import schema
>>> imp = schema.Impression(event_id="i1", ts=1_767_225_600_000, user_id=7, ad_id=3, campaign_id=1,
...                         advertiser_id=1, domain="feed", cat=[1, 2], dense=[0.5])
>>> lines = [schema.encode(imp), b"", b"{oops"]
>>> p = plan_block(lines, 10, Router(4))
>>> p.tidx, p.keys, list(p.parts), p.good, p.blank, [n for n, _ in p.failed]
(b'\\x00', b'7', [3], b'\\x01\\x00\\x00', 1, [12])
"""

from __future__ import annotations

import operator
from array import array
from itertools import chain, compress, repeat
from typing import Union

import msgspec

from streams import schema
from streams.bus.partition import partition_for

TOPIC_INDEX = {"impression": 0, "click": 1, "conversion": 2}  # index into (impressions, clicks, conversions)
_WATERMARK = 3


class Plan(msgspec.Struct, array_like=True, gc=False):
    """What to do with one block of lines (``first`` = number of its first line, ``n_lines`` = L).

    tidx:   (E,) bytes, topic index (:data:`TOPIC_INDEX`) of each good event, in line order
    keys:   the E Kafka keys (user ids as decimal text) joined by single spaces
    parts:  (E,) partitions: bytes when there are at most 256 partitions, else little-endian uint32
    good:   (L,) bytes, 1 where the line is a good event; ``b""`` when every line is one
    marks:  (events before it, line index) of each watermark line, in order
    failed: (line number, reason) of each failed line; ``blank`` = lines that are empty or whitespace
    nbytes: length of the block's bytes (the consumer checks it read the same block)
    """

    first: int
    n_lines: int
    nbytes: int
    tidx: bytes
    keys: bytes
    parts: bytes
    good: bytes = b""
    marks: list[tuple[int, int]] = []
    failed: list[tuple[int, str]] = []
    blank: int = 0
    max_ts: int = 0


class Router:
    """User id -> partition (:func:`streams.bus.partition.partition_for` of the decimal key), cached: murmur2 in
    Python costs ~3 us and user ids repeat."""

    MAX_CACHED = 1 << 20

    def __init__(self, partitions: int):
        if partitions < 1:
            raise ValueError(f"Router: partitions must be >= 1, got {partitions}")
        self.partitions = partitions
        self.wide = partitions > 256
        self._cache: dict[int, int] = {}

    def part(self, uid: int) -> int:
        """The partition of one user id."""
        p = self._cache.get(uid)
        if p is None:
            if len(self._cache) > self.MAX_CACHED:
                self._cache.clear()
            p = self._cache[uid] = partition_for(str(uid).encode(), self.partitions)
        return p

    def parts(self, uids: list[int]) -> bytes:
        cache = self._cache
        if len(cache) > self.MAX_CACHED:
            cache.clear()  # memory stays bounded however many users a log holds
        for u in set(uids).difference(cache):
            cache[u] = partition_for(str(u).encode(), self.partitions)
        out = list(map(cache.__getitem__, uids))
        return array("I", out).tobytes() if self.wide else bytes(out)


def split_lines(data: bytes) -> list[bytes]:
    """The lines of a block (line breaks and a CR before them removed)."""
    lines = data.split(b"\n")
    if b"\r" in data:
        lines = [x.rstrip(b"\r") for x in lines]
    return lines


# -- fast path ----------------------------------------------------------------------------------------------

def _raw_list_rule(t: msgspec.inspect.Type) -> tuple[bytes, int, int] | None:
    """For a list field that can be checked on its raw JSON: (characters its numbers may hold, longest digit
    run, max_length); None for any other field (it stays typed)."""
    if not isinstance(t, msgspec.inspect.ListType) or t.min_length or not t.max_length:
        return None
    it = t.item_type
    if (isinstance(it, msgspec.inspect.IntType) and it.ge == 0 and it.gt is None and it.lt is None
            and it.multiple_of is None and it.le is not None and it.le >= 9):
        return b"0123456789", len(str(it.le)) - 1, t.max_length  # non-negative integers below 10**run <= le
    if isinstance(it, msgspec.inspect.FloatType) and it == msgspec.inspect.FloatType():
        return b"0123456789-.", 18, t.max_length  # no exponent and <= 18 digits: finite, as schema.check wants
    return None


def _make_fast_impression() -> tuple[type, dict[str, tuple[bytes, int, int]], int]:
    """schema.Impression with its checkable list fields as raw JSON and *every* field required; also how
    many double quotes such a record's line holds at least (2 per key, 2 per string value)."""
    info = {f.name: f for f in msgspec.inspect.type_info(schema.Impression).fields}
    fields, rules, quotes = [], {}, 4  # the "type" key and its value
    for f in msgspec.structs.fields(schema.Impression):
        if f.encode_name != f.name:
            raise TypeError(f"lineplan: Impression field {f.name!r} is renamed; the fast path does not expect it")
        t = info[f.name].type
        rule = _raw_list_rule(t)
        if rule is not None:
            rules[f.name] = rule
        fields.append((f.name, msgspec.Raw if rule is not None else f.type))
        quotes += 2 + 2 * isinstance(t, msgspec.inspect.StrType)
    cfg = schema.Impression.__struct_config__
    cls = msgspec.defstruct("FastImpression", fields, frozen=True, gc=False, tag=cfg.tag, tag_field=cfg.tag_field,
                            forbid_unknown_fields=cfg.forbid_unknown_fields)
    return cls, rules, quotes


FastImpression, _RAW_RULES, _IMP_QUOTES = _make_fast_impression()
FastRecord = Union[FastImpression, schema.Click, schema.Conversion, schema.Watermark]
_fast_decode = msgspec.json.Decoder(FastRecord).decode
_full_decode = msgspec.json.Decoder(schema.Record).decode
_KIND = {FastImpression: 0, schema.Impression: 0, schema.Click: 1, schema.Conversion: 2, schema.Watermark: 3}
_DOMAINS = frozenset(schema.DOMAIN_INDEX)
_RULE_FIELDS = [(rule, tuple(n for n in _RAW_RULES if _RAW_RULES[n] == rule)) for rule in set(_RAW_RULES.values())]
_DIGITS_TO_0 = bytes.maketrans(b"123456789", b"000000000")
_user_id, _ts, _domain = operator.attrgetter("user_id"), operator.attrgetter("ts"), operator.attrgetter("domain")
_tokens = operator.attrgetter("event_id", "device", "country")


def _raw_lists_ok(imps: list, names: tuple[str, ...], rule: tuple[bytes, int, int]) -> bool:
    """Whether the raw JSON of list fields ``names`` of every impression meets ``rule`` (:func:`_raw_list_rule`).
    A few C passes over the joined lists; msgspec has checked their JSON syntax already."""
    number_chars, run, max_len = rule
    get = operator.attrgetter(*names)
    blob = b"|".join(chain.from_iterable(map(get, imps)) if len(names) > 1 else map(get, imps))
    n = len(imps) * len(names)
    shape = blob.translate(None, number_chars)   # what is left between the numbers: "[,,]|[]|[,]"
    return (not shape.translate(None, b",[]|")   # only numbers of the rule's kind (no exponent, ids unsigned)
            and shape.count(b"[") == n           # one "[" each, at the start: flat arrays
            and shape.count(b"|[") == n - 1
            and shape[:1] == b"["
            and b"," * max_len not in shape      # at most max_length elements each
            and b"0" * (run + 1) not in blob.translate(_DIGITS_TO_0))  # every number within the bound


def _fast_block(data: bytes, lines: list[bytes]) -> tuple[list, bytes] | None:
    """Every line's record (:data:`FastRecord`) and kind (:data:`_KIND`), or None when the fast path cannot
    prove every line valid for ``schema.decode``.

    Soundness: FastImpression types every field as schema.Impression does except the raw lists, which
    :func:`_raw_lists_ok` checks against their declared constraints, and requires every field. msgspec
    validates *every* occurrence of a duplicated key (the last one wins), so a duplicated raw list could hide
    a bad first value: each key and each string value takes two double quotes, so impression lines holding
    exactly the minimum number of quotes have no key twice (and no unknown field).
    """
    try:
        recs = list(map(_fast_decode, lines))
    except schema.DECODE_ERRORS:
        return None
    kinds = bytes(map(_KIND.__getitem__, map(type, recs)))
    n_imp = kinds.count(0)
    if n_imp:
        imps = recs
        quotes = data.count(b'"')
        if n_imp != len(recs):
            imps = list(compress(recs, map((0).__eq__, kinds)))
            quotes -= sum(map(bytes.count, compress(lines, map((0).__ne__, kinds)), repeat(b'"')))
        if quotes != n_imp * _IMP_QUOTES or not all(_raw_lists_ok(imps, names, rule) for rule, names in _RULE_FIELDS):
            return None
        if not set(map(_domain, imps)) <= _DOMAINS:  # schema.check: unknown domain
            return None
        if not schema.tokens_ok("".join(chain.from_iterable(map(_tokens, imps)))):  # schema.check: tokens
            return None
    if n_imp != len(recs) and any(map(schema.check, compress(recs, map((0).__ne__, kinds)))):
        return None
    return recs, kinds


# -- plans ----------------------------------------------------------------------------------------------------

def plan_block(lines: list[bytes], first: int, router: Router, data: bytes | None = None) -> Plan:
    """The :class:`Plan` of ``lines`` (line ``first`` onwards); ``data``: the block's bytes when the caller
    has them (``lines == split_lines(data)``)."""
    if data is None:
        data = b"\n".join(lines)
    nbytes = len(data)
    fast = _fast_block(data, lines) if lines else None
    if fast is not None:
        recs, kinds = fast
        if _WATERMARK not in kinds:
            return _plan(first, lines, nbytes, router, kinds, recs)
        marks, evs = [], []
        for i, (r, k) in enumerate(zip(recs, kinds)):
            if k == _WATERMARK:
                marks.append((len(evs), i))
            else:
                evs.append(r)
        good = kinds.replace(b"\x00", b"\x01").replace(b"\x02", b"\x01").replace(b"\x03", b"\x00")
        return _plan(first, lines, nbytes, router, kinds.replace(b"\x03", b""), evs, good=good, marks=marks)
    return _plan_each(first, lines, nbytes, router)


def _plan(first, lines, nbytes, router, tidx, evs, *, good=b"", marks=(), failed=(), blank=0) -> Plan:
    uids = list(map(_user_id, evs))
    return Plan(first=first, n_lines=len(lines), nbytes=nbytes, tidx=tidx, keys=" ".join(map(str, uids)).encode(),
                parts=router.parts(uids), good=good, marks=list(marks), failed=list(failed), blank=blank,
                max_ts=max(map(_ts, evs), default=0))


class _Ev(msgspec.Struct, gc=False):
    user_id: int
    ts: int


def _plan_each(first: int, lines: list[bytes], nbytes: int, router: Router) -> Plan:
    """Reference path: ``schema``'s decoder and ``schema.check`` line by line. Records are dropped as soon as
    they are read (holding a block of them costs more in GC passes than decoding)."""
    dec, check, kind_of = _full_decode, schema.check, _KIND
    good, tidx, evs, marks, failed = bytearray(len(lines)), bytearray(), [], [], []
    blank = 0
    for i, raw in enumerate(lines):
        try:
            rec = dec(raw)
        except schema.DECODE_ERRORS:
            if raw.strip():
                failed.append(i)
            else:
                blank += 1
            continue
        if check(rec) is not None:
            failed.append(i)
            continue
        k = kind_of[type(rec)]
        if k == _WATERMARK:
            marks.append((len(evs), i))
            continue
        good[i] = 1
        tidx.append(k)
        evs.append(_Ev(rec.user_id, rec.ts))
    reasons = [(first + i, _reason(lines[i])) for i in failed]
    return _plan(first, lines, nbytes, router, bytes(tidx), evs, good=bytes(good) if len(tidx) < len(lines) else b"",
                 marks=marks, failed=reasons, blank=blank)


def _reason(raw: bytes) -> str:
    why = schema.decode(raw)  # never raises: invalid UTF-8 in a key is "unparseable" there too
    return why.reason if isinstance(why, schema.Invalid) else "invalid"
