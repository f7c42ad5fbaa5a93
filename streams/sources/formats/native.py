"""Our own logs: JSONL (one ``schema.encode`` record per line) and Parquet (one row per record).

Parquet columns (:func:`parquet_schema`); a column a record type does not have is null::

    type           string   impression | click | conversion | watermark   (null for a raw row)
    event_id       string   impression / click / conversion id
    ts             int64    event time, ms since the epoch
    user_id        int64
    ad_id, campaign_id, advertiser_id   int64   (impressions)
    domain, device, country             string  (impressions)
    position       int32                        (impressions)
    cat, history   list<int64>, dense list<float64>   (impressions)
    impression_id  string   (clicks, conversions)
    kind           string, value float64           (conversions)
    source         string   (watermarks)
    raw            binary   a record kept as raw bytes (``BadRecord`` of ``--bad-rate``): decoded at replay

>>> import tempfile, os
>>> imp = schema.Impression(event_id="i1", ts=1_767_225_600_000, user_id=7, ad_id=3, campaign_id=1,
...                         advertiser_id=1, domain="feed", cat=[1, 2], dense=[0.5])
>>> path = os.path.join(tempfile.mkdtemp(), "log.parquet")
>>> write_parquet(path, [imp, schema.Watermark(ts=1_767_225_600_001)])
2
>>> [r.records for r in read_parquet(Path(path), ReadOptions())] == [(imp,), (schema.Watermark(ts=1_767_225_600_001),)]
True
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq

from streams import schema
from streams.sources.formats import BadLine, Format, Item, ReadOptions, Row
from streams.sources.logfile import BadRecord, iter_jsonl

_TYPES = {schema.Impression: "impression", schema.Click: "click", schema.Conversion: "conversion",
          schema.Watermark: "watermark"}


def parquet_schema() -> pa.Schema:
    s, i64 = pa.string(), pa.int64()
    return pa.schema([("type", s), ("event_id", s), ("ts", i64), ("user_id", i64), ("ad_id", i64),
                      ("campaign_id", i64), ("advertiser_id", i64), ("domain", s), ("position", pa.int32()),
                      ("device", s), ("country", s), ("cat", pa.list_(i64)), ("dense", pa.list_(pa.float64())),
                      ("history", pa.list_(i64)), ("impression_id", s), ("kind", s), ("value", pa.float64()),
                      ("source", s), ("arm", s), ("model_version", i64), ("raw", pa.binary())])


def _table(records: list) -> pa.Table:
    names = parquet_schema().names
    cols: dict[str, list] = {n: [None] * len(records) for n in names}
    for i, rec in enumerate(records):
        if isinstance(rec, BadRecord):
            cols["raw"][i] = rec.raw
            continue
        cols["type"][i] = _TYPES[type(rec)]
        for f in rec.__struct_fields__:  # every field of every record type has its column (test_formats)
            cols[f][i] = getattr(rec, f)
    return pa.table(cols, schema=parquet_schema())


def write_parquet(path: str | os.PathLike, records: Iterable, chunk: int = 65_536) -> int:
    """Write events / watermarks / BadRecords, one row each, in row groups of ``chunk``; returns rows."""
    n = 0
    with pq.ParquetWriter(str(path), parquet_schema(), compression="zstd") as w:
        buf: list = []
        for rec in records:
            buf.append(rec)
            if len(buf) >= chunk:
                w.write_table(_table(buf))
                n, buf = n + len(buf), []
        if buf or not n:
            w.write_table(_table(buf))
            n += len(buf)
    return n


def read_parquet(path: Path, options: ReadOptions) -> Iterator[Item]:
    """Rows in file order; line number = 1-based row index. A row that does not convert is a BadLine."""
    n = 0
    for batch in pq.ParquetFile(str(path)).iter_batches(batch_size=8192):
        for d in batch.to_pylist():
            n += 1
            raw = d.pop("raw", None)
            if raw is not None:
                rec = schema.decode(raw)
            else:
                d = {k: v for k, v in d.items() if v is not None}
                try:
                    rec = msgspec.convert(d, schema.Record)
                    why = schema.check(rec)
                    rec = schema.Invalid(f"invalid: {why}") if why else rec
                except msgspec.ValidationError as e:
                    rec = schema.Invalid(f"schema: {e}")
                raw = msgspec.json.encode(d)
            if isinstance(rec, schema.Invalid):
                yield BadLine(n, f"row {n}: {rec.reason}", raw)
            else:
                yield Row(n, (rec,))


def read_jsonl(path: Path, options: ReadOptions) -> Iterator[Item]:
    """One record per line; the row carries the line's bytes so replay sends them without re-encoding."""
    decode, Invalid = schema.decode, schema.Invalid
    for n, raw in iter_jsonl(path):
        rec = decode(raw)
        if type(rec) is Invalid:
            yield BadLine(n, f"line {n}: {rec.reason}", raw)
        else:
            yield Row(n, (rec,), raw)


def _never(head: str) -> bool:
    return False


def _jsonl_head(head: str) -> bool:
    return head.lstrip().startswith("{")


JSONL = Format("jsonl", read_jsonl, _jsonl_head, (".jsonl", ".ndjson", ".json", ".log"), "event")
PARQUET = Format("parquet", read_parquet, _never, (".parquet", ".pq"), "event")
