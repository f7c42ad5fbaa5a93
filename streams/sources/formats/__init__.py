"""Event-log formats that ``streamrec replay`` reads: our native logs and adapters for public ads datasets.

Every format is a :class:`Format`: a reader ``(path, ReadOptions) -> iterator of Row | BadLine`` plus a
header sniffer for ``--format auto``. A :class:`Row` is what one source line became (an impression first,
then its click / conversion, or a single native record); a :class:`BadLine` names the line and the reason,
and replay turns it into a dead letter and goes on.

==================  ==========================================  =================================================
name                module                                      source
==================  ==========================================  =================================================
jsonl               :mod:`streams.sources.formats.native`               ``streamrec generate --out X.jsonl``
parquet             :mod:`streams.sources.formats.native`               ``streamrec generate --out X.parquet``
criteo              :mod:`streams.sources.formats.criteo`               Criteo display-ads (Kaggle ``train.txt``)
criteo-attribution  :mod:`streams.sources.formats.criteo_attribution`   Criteo Attribution Modeling (TSV, header)
ali-ccp             :mod:`streams.sources.formats.ali_ccp`              Ali-CCP (click + purchase, torch-rechub CSV)
aliexpress          :mod:`streams.sources.formats.aliexpress`           AliExpress search ads (click + conversion)
avazu               :mod:`streams.sources.formats.avazu`                Avazu CTR (Kaggle ``train.csv``, hourly)
taobao              :mod:`streams.sources.formats.taobao`               Taobao display-ad (``raw_sample`` + joins)
taobao-dmr          :mod:`streams.sources.formats.taobao_dmr`           Taobao display-ad, DMR 50-step sequences
==================  ==========================================  =================================================

Shared rules of the public-format adapters (each module documents its column mapping):

* event ids are deterministic: ``<format>-<file stem>-<line>`` for the impression, with ``:click`` /
  ``:conversion`` appended for its feedback, so replaying a file twice is recognisable downstream;
* string user ids are hashed with :func:`stable_id` (BLAKE2b, the same in every process and run);
* a format without timestamps gets monotone synthetic ones, ``ReadOptions.start_ts + i * row_interval_ms``
  for the i-th data row; feedback without its own timestamp gets the impression's (delay 0);
* rows are yielded in source order; :func:`in_time_order` holds back feedback whose timestamp is later than
  the rows still to come (Criteo attribution conversions arrive days later) so replay stays in event time.
"""

from __future__ import annotations

import gzip
import hashlib
import heapq
import io
import math
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Union

import msgspec

from streams import schema

SYNTH_START_TS = 1_767_225_600_000  # 2026-01-01T00:00:00Z: start of synthesized timestamps
MAX_STEM = 60  # file stem chars kept in event ids (EventId max length is 128)


class ReadOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How a reader turns rows into events. ``start_ts`` / ``row_interval_ms`` only apply to formats
    without timestamps (and Criteo attribution's relative seconds)."""

    start_ts: int = SYNTH_START_TS
    row_interval_ms: int = 100

    def __post_init__(self) -> None:
        if not schema.MIN_TS_MS <= self.start_ts <= schema.MAX_TS_MS:
            raise ValueError(f"ReadOptions.start_ts: {self.start_ts} is outside 2000..2100 (ms since the epoch)")
        if self.row_interval_ms < 0:
            raise ValueError(f"ReadOptions.row_interval_ms: must be >= 0, got {self.row_interval_ms}")


class Row(NamedTuple):
    """What source line ``line`` became: records in emit order (impression first). ``raw``: the exact
    message bytes of a single-record row when they are already our JSON encoding (native JSONL)."""

    line: int
    records: tuple
    raw: bytes | None = None


class BadLine(NamedTuple):
    """Source line ``line`` could not be used: why, and its raw bytes (for the dead letter)."""

    line: int
    reason: str
    raw: bytes


Item = Union[Row, BadLine]
Reader = Callable[[Path, ReadOptions], Iterator[Item]]


class Format(NamedTuple):
    name: str
    read: Reader
    sniff: Callable[[str], bool]  # first line of the file (decoded, no line break) -> is it this format?
    suffixes: tuple[str, ...] = ()
    timestamps: str = "none"  # what the format carries: "event", "hourly", "relative", "none"


class FormatError(ValueError):
    """The file's format is unknown, or the file does not fit the format asked for."""


# ------------------------------------------------------------------------------------------------ helpers

def stable_id(text: str) -> int:
    """A non-negative 63-bit id for a string, the same in every process (Python's ``hash`` is salted).

    >>> stable_id("a99f214a") == stable_id("a99f214a"), 0 <= stable_id("") < 2**63
    (True, True)
    """
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & schema.MAX_ID


def event_ids(fmt: str, path: Path, line: int) -> tuple[str, str, str]:
    """(impression, click, conversion) event ids of source line ``line``."""
    stem = re.sub(f"[^{schema.TOKEN_CHARS}]", "_", path.name.split(".")[0][:MAX_STEM])  # ids are tokens
    base = f"{fmt}-{stem}-{line}"
    return base, base + ":click", base + ":conversion"


def parse_time(text: str) -> int:
    """Milliseconds since the epoch from ms / s digits or an ISO date(time) (UTC when no zone is given).

    >>> parse_time("2026-01-01"), parse_time("1767225600"), parse_time("2026-01-01T00:00:01+00:00")
    (1767225600000, 1767225600000, 1767225601000)
    """
    s = text.strip()
    if s.lstrip("-").isdigit():
        v = int(s)
        return v * 1000 if abs(v) < 10**11 else v  # < 10^11: seconds (until year 5138)
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        raise ValueError(f"bad time {text!r}: expected ms, s, or an ISO date like 2026-01-01T12:00") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp() * 1000)


def signed_log1p(x: float) -> float:
    """``sign(x) * log(1 + |x|)``: heavy-tailed counts (Criteo I1..I13, prices) into a trainable range."""
    return math.copysign(math.log1p(abs(x)), x)


def open_text(path: Path) -> io.TextIOBase:
    """Text handle, transparently gunzipping ``*.gz`` (the public dumps ship gzipped)."""
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace", newline="")
    return open(path, encoding="utf-8", errors="replace", newline="")


def first_line(path: Path) -> str:
    with open_text(path) as f:
        return f.readline(1 << 16).rstrip("\r\n")


def split_line(line: str, sep: str) -> list[str]:
    """Fields of one delimited line; quoted fields only when the line has quotes (the datasets never do)."""
    if '"' not in line:
        return line.split(sep)
    import csv

    return next(csv.reader([line], delimiter=sep))


def delimited_rows(path: Path, fmt: str, convert: Callable[[list[str], int], tuple],
                   header: Callable[[list[str]], bool] | None, sep: str = ",",
                   expect: Callable[[list[str] | None], set[int]] | None = None) -> Iterator[Item]:
    """Read a delimited file line by line: ``convert(fields, line_no) -> records``.

    ``header(fields)`` says whether the first line is a header (its fields are then passed to ``expect``,
    which returns the allowed field counts). A ValueError / IndexError / ValidationError raised by
    ``convert`` becomes a :class:`BadLine` naming the format and the line.
    """
    names: list[str] | None = None
    counts: set[int] | None = None
    with open_text(path) as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = split_line(line, sep)
            if n == 1 and header is not None and header(fields):
                names = fields
                counts = expect(names) if expect else {len(names)}
                continue
            if counts is None:
                counts = expect(None) if expect else {len(fields)}
            if len(fields) not in counts:
                yield BadLine(n, f"{fmt} line {n}: expected {' or '.join(map(str, sorted(counts)))} "
                                 f"fields, got {len(fields)}", line.encode())
                continue
            try:
                records = convert(fields, n)
            except (ValueError, IndexError, msgspec.ValidationError) as e:
                yield BadLine(n, f"{fmt} line {n}: {e}", line.encode())
                continue
            bad = next((r for r in (schema.check(x) for x in records) if r), None)
            if bad:
                yield BadLine(n, f"{fmt} line {n}: invalid: {bad}", line.encode())
            else:
                yield Row(n, records)


def feedback(fmt: str, path: Path, line: int, imp: schema.Impression, click: bool, conversion: bool,
             click_ts: int | None = None, conversion_ts: int | None = None, value: float = 0.0) -> tuple:
    """The impression followed by its click / conversion records (feedback ts defaults to the impression's)."""
    _, cid, vid = event_ids(fmt, path, line)
    out: list = [imp]
    if click:
        out.append(schema.Click(event_id=cid, impression_id=imp.event_id, ts=click_ts or imp.ts,
                                user_id=imp.user_id))
    if conversion:
        out.append(schema.Conversion(event_id=vid, impression_id=imp.event_id, ts=conversion_ts or imp.ts,
                                     user_id=imp.user_id, value=value))
    return tuple(out)


def ints(fields: Iterable[str]) -> list[int]:
    """Integer ids; empty -> 0 (missing); negatives and non-integers raise ValueError."""
    out = []
    for x in fields:
        v = int(float(x)) if x else 0
        if v < 0:
            raise ValueError(f"negative id {x!r}")
        out.append(v)
    return out


def flags(what: str, *fields: str) -> list[int]:
    """Label columns that must be 0 or 1, as ints; ``what`` names them for the error.

    >>> flags("click/purchase", "1", "0")
    [1, 0]
    """
    v = [int(x) for x in fields]
    if any(x not in (0, 1) for x in v):
        raise ValueError(f"{what} must be 0 or 1, got {'/'.join(map(str, v))}")
    return v


def floats(fields: Iterable[str]) -> list[float]:
    return [float(x) if x else 0.0 for x in fields]


def in_time_order(items: Iterable[Item]) -> Iterator[Item]:
    """Delay records whose ts is ahead of the row being read until the rows catch up with them.

    The "now" of the stream is the max ts of the rows' first records (the impressions); records of a row
    with a later ts wait in a heap. Memory is bounded by the feedback inside one attribution window.
    """
    heap: list[tuple[int, int, object]] = []
    now, seq = -1, 0
    for item in items:
        if isinstance(item, BadLine):
            yield item
            continue
        first, rest = item.records[0], item.records[1:]
        now = max(now, getattr(first, "ts", now))
        while heap and heap[0][0] <= now:
            ts, _, (line, rec) = heapq.heappop(heap)
            yield Row(line, (rec,))
        if all(getattr(r, "ts", now) <= now for r in rest):
            yield item
            continue
        yield Row(item.line, (first,))
        for r in rest:
            if r.ts <= now:
                yield Row(item.line, (r,))
            else:
                seq += 1
                heapq.heappush(heap, (r.ts, seq, (item.line, r)))
    while heap:
        ts, _, (line, rec) = heapq.heappop(heap)
        yield Row(line, (rec,))


# ------------------------------------------------------------------------------------------------ registry

def _registry() -> dict[str, Format]:
    from streams.sources.formats import (ali_ccp, aliexpress, avazu, criteo, criteo_attribution, native, taobao,
                                         taobao_dmr)

    fmts = [native.JSONL, native.PARQUET, criteo.FORMAT, criteo_attribution.FORMAT, ali_ccp.FORMAT,
            aliexpress.FORMAT, avazu.FORMAT, taobao.FORMAT, taobao_dmr.FORMAT]
    return {f.name: f for f in fmts}


_FORMATS: dict[str, Format] = {}


def formats() -> dict[str, Format]:
    """Name -> :class:`Format`, in ``--format`` order."""
    if not _FORMATS:
        _FORMATS.update(_registry())
    return _FORMATS


def detect(path: str | Path) -> str:
    """The format of ``path``: by suffix (``.jsonl``, ``.parquet``), else by sniffing its first line."""
    path = Path(path)
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    for f in formats().values():
        if suffixes and suffixes[-1] in f.suffixes:
            return f.name
    head = first_line(path)
    for f in formats().values():
        if f.sniff(head):
            return f.name
    raise FormatError(f"replay: cannot tell the format of {path.name} from its name or first line "
                      f"{head[:80]!r}; pass --format ({', '.join(formats())})")


def read(path: str | Path, fmt: str = "auto", options: ReadOptions = ReadOptions()) -> Iterator[Item]:
    """Rows and bad lines of ``path`` in event-time order (see :func:`in_time_order`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"replay: no such log file: {path}")
    name = detect(path) if fmt == "auto" else fmt
    f = formats().get(name)
    if f is None:
        raise FormatError(f"replay: unknown format {fmt!r} (known: auto, {', '.join(formats())})")
    items = f.read(path, options)
    return items if name in ("jsonl", "parquet") else in_time_order(items)
