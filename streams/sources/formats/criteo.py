"""Criteo display-ads challenge (Kaggle ``train.txt`` / ``test.txt``): one impression per line.

Layout: ``label, I1..I13, C1..C26`` (40 fields; ``test.txt`` has no label, 39 fields). The original is
tab-separated without a header; the DeepCTR sample in ``shared/data/criteo_kaggle_sample`` is
comma-separated with the header ``label,I1,...,C26``. Both are read (the separator is taken from the first
line). Empty fields are missing values.

Mapping to :class:`~streams.schema.Impression`:

* ``ts``: none in the data (Criteo only says rows are in time order): ``start_ts + i * row_interval_ms``;
* ``user_id``: none in the data: every row is its own anonymous user, ``stable_id(event id)`` (spreads
  partitions evenly; nothing links rows of one person);
* ``ad_id = campaign_id = advertiser_id = 0`` (not disclosed); ``domain = "display"``;
* ``cat``: C1..C26, 32-bit hex -> int (missing -> 0); ``dense``: I1..I13 as ``signed_log1p`` (missing -> 0);
* ``label = 1`` -> a :class:`~streams.schema.Click` at the impression's ts (click time unknown).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from streams import schema
from streams.sources.formats import (Format, Item, ReadOptions, delimited_rows, event_ids, feedback, first_line,
                                     signed_log1p, stable_id)

NAME = "criteo"
N_DENSE, N_CAT = 13, 26


def _hex(x: str) -> int:
    return int(x, 16) if x else 0


def read(path: Path, options: ReadOptions) -> Iterator[Item]:
    sep = "\t" if "\t" in first_line(path) else ","
    row = [0]

    def convert(f: list[str], n: int) -> tuple:
        i = row[0]
        row[0] += 1
        has_label = len(f) == 1 + N_DENSE + N_CAT
        off = 1 if has_label else 0
        label = int(f[0]) if has_label else 0
        if label not in (0, 1):
            raise ValueError(f"label must be 0 or 1, got {f[0]!r}")
        dense = [signed_log1p(float(x)) if x else 0.0 for x in f[off:off + N_DENSE]]
        cat = [_hex(x) for x in f[off + N_DENSE:]]
        iid, _, _ = event_ids(NAME, path, n)
        imp = schema.Impression(event_id=iid, ts=options.start_ts + i * options.row_interval_ms,
                                user_id=stable_id(iid), ad_id=0, campaign_id=0, advertiser_id=0,
                                domain="display", cat=cat, dense=dense)
        return feedback(NAME, path, n, imp, click=label == 1, conversion=False)

    return delimited_rows(path, NAME, convert, header=lambda f: f[0] == "label", sep=sep,
                          expect=lambda names: {39, 40})


def sniff(head: str) -> bool:
    if head.startswith(("label,I1,", "label\tI1\t")):
        return True
    f = head.split("\t")
    return len(f) in (39, 40) and all(len(x) in (0, 8) for x in f[-N_CAT:])


FORMAT = Format(NAME, read, sniff, (), "none")
