"""Ali-CCP (Alibaba Click and Conversion Prediction, the ESMM dataset) as prepared by torch-rechub.

Layout (CSV with header, 33 columns): ``click, purchase``, 23 label-encoded sparse fields (``101`` user,
``205`` item, ``206`` category, ``207`` shop, ``216`` brand, ... ; 0 = missing) and 8 normalised dense
fields ``D...``. Columns are found by header name, so a file with fewer or reordered fields works.

Mapping: ``user_id = 101``, ``ad_id = 205`` (item), ``campaign_id = 216`` (brand), ``advertiser_id = 207``
(shop); ``cat`` = the other sparse fields in header order; ``dense`` = the ``D*`` fields; ``domain = "feed"``
(Taobao's recommendation feed). No timestamps: ``start_ts + i * row_interval_ms``. ``click = 1`` -> Click,
``purchase = 1`` -> Conversion, both at the impression's ts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from streams import schema
from streams.sources.formats import (Format, Item, ReadOptions, delimited_rows, event_ids, feedback, first_line, flags,
                                     ints)

NAME = "ali-ccp"
_ID_COLS = ("101", "205", "216", "207")


def read(path: Path, options: ReadOptions) -> Iterator[Item]:
    names = first_line(path).split(",")
    missing = [c for c in ("click", "purchase", *_ID_COLS) if c not in names]
    if missing:
        raise ValueError(f"{NAME}: {path.name} lacks columns {missing} in its header")
    col = {c: i for i, c in enumerate(names)}
    user, item, brand, shop = (col[c] for c in _ID_COLS)
    cat_cols = [i for i, c in enumerate(names) if c not in ("click", "purchase", *_ID_COLS) and not c.startswith("D")]
    dense_cols = [i for i, c in enumerate(names) if c.startswith("D")]
    row = [0]

    def convert(f: list[str], n: int) -> tuple:
        i = row[0]
        row[0] += 1
        click, purchase = flags("click/purchase", f[col["click"]], f[col["purchase"]])
        u, a, b, s = ints((f[user], f[item], f[brand], f[shop]))
        imp = schema.Impression(event_id=event_ids(NAME, path, n)[0],
                                ts=options.start_ts + i * options.row_interval_ms, user_id=u, ad_id=a,
                                campaign_id=b, advertiser_id=s, domain="feed", cat=ints(f[j] for j in cat_cols),
                                dense=[float(f[j]) if f[j] else 0.0 for j in dense_cols])
        return feedback(NAME, path, n, imp, click=click == 1, conversion=purchase == 1)

    return delimited_rows(path, NAME, convert, header=lambda f: f[0] == "click")


def sniff(head: str) -> bool:
    return head.startswith("click,purchase,")


FORMAT = Format(NAME, read, sniff, (), "none")
