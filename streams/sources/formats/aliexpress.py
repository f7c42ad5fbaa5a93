"""AliExpress multi-domain search ads (Tianchi 74690) as prepared by torch-rechub: one exposure per row.

Layout (CSV with header, 82 columns): ``search_id, categorical_1..16, numerical_1..63, click, conversion``.

Mapping: no user column; the search request is the closest thing (its exposures belong to one visitor), so
``user_id = search_id`` (non-integer ids are hashed with ``stable_id``) and a request's rows share a
partition. ``ad_id = campaign_id = advertiser_id = 0`` (not in the data); ``cat`` = categorical_1..16;
``dense`` = numerical_1..63; ``domain = "search"``. No timestamps: ``start_ts + i * row_interval_ms``.
``click`` -> Click, ``conversion`` -> Conversion, at the impression's ts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from streams import schema
from streams.sources.formats import (Format, Item, ReadOptions, delimited_rows, event_ids, feedback, first_line, flags,
                                     floats, ints, stable_id)

NAME = "aliexpress"


def read(path: Path, options: ReadOptions) -> Iterator[Item]:
    names = first_line(path).split(",")
    col = {c: i for i, c in enumerate(names)}
    if not {"search_id", "click", "conversion"} <= set(col):
        raise ValueError(f"{NAME}: {path.name} lacks search_id/click/conversion in its header")
    cat_cols = [i for i, c in enumerate(names) if c.startswith("categorical_")]
    dense_cols = [i for i, c in enumerate(names) if c.startswith("numerical_")]
    row = [0]

    def convert(f: list[str], n: int) -> tuple:
        i = row[0]
        row[0] += 1
        click, conv = flags("click/conversion", f[col["click"]], f[col["conversion"]])
        sid = f[col["search_id"]]
        user = int(sid) if sid.isdigit() else stable_id(sid)
        imp = schema.Impression(event_id=event_ids(NAME, path, n)[0],
                                ts=options.start_ts + i * options.row_interval_ms, user_id=user, ad_id=0,
                                campaign_id=0, advertiser_id=0, domain="search",
                                cat=ints(f[j] for j in cat_cols), dense=floats(f[j] for j in dense_cols))
        return feedback(NAME, path, n, imp, click=click == 1, conversion=conv == 1)

    return delimited_rows(path, NAME, convert, header=lambda f: f[0] == "search_id")


def sniff(head: str) -> bool:
    return head.startswith("search_id,categorical_1")


FORMAT = Format(NAME, read, sniff, (), "none")
