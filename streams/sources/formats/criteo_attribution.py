"""Criteo Attribution Modeling for Bidding dataset (``criteo_attribution_dataset.tsv.gz``, CC BY-NC-SA 4.0).

Layout (tab-separated, header): ``timestamp, uid, campaign, conversion, conversion_timestamp,
conversion_id, attribution, click, click_pos, click_nb, cost, cpo, time_since_last_click, cat1..cat9``.
``timestamp`` / ``conversion_timestamp`` are seconds from the start of the 30-day log (-1 = none).
No sample is in ``shared/data`` (none is published in a repository); the tests use rows in this layout.

Mapping: ``ts = start_ts + 1000 * timestamp``; ``user_id = uid``; ``campaign_id = campaign``;
``ad_id = advertiser_id = 0`` (not in the data); ``domain = "display"``; ``cat = cat1..cat9``;
``dense = [signed_log1p(time_since_last_click)]`` (-1 = never clicked before). ``click = 1`` -> Click at the
impression's ts; ``attribution = 1`` (the conversion is attributed to this impression, last-click within
30 days) -> Conversion at ``start_ts + 1000 * conversion_timestamp`` -- days later, so replay holds it back
until the log reaches that time (:func:`streams.sources.formats.in_time_order`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from streams import schema
from streams.sources.formats import (Format, Item, ReadOptions, delimited_rows, event_ids, feedback, first_line, flags,
                                     ints, signed_log1p)

NAME = "criteo-attribution"
COLUMNS = ("timestamp", "uid", "campaign", "conversion", "conversion_timestamp", "conversion_id", "attribution",
           "click", "click_pos", "click_nb", "cost", "cpo", "time_since_last_click",
           *(f"cat{i}" for i in range(1, 10)))


def read(path: Path, options: ReadOptions) -> Iterator[Item]:
    names = first_line(path).split("\t")
    col = {c: i for i, c in enumerate(names)}
    if not set(COLUMNS) <= set(col):
        raise ValueError(f"{NAME}: {path.name} lacks columns {sorted(set(COLUMNS) - set(col))} in its header")
    cats = [col[f"cat{i}"] for i in range(1, 10)]

    def convert(f: list[str], n: int) -> tuple:
        ts = options.start_ts + 1000 * int(f[col["timestamp"]])
        click, attributed = flags("click/attribution", f[col["click"]], f[col["attribution"]])
        conv_s = int(f[col["conversion_timestamp"]])
        if attributed and conv_s < 0:
            raise ValueError("attributed conversion without conversion_timestamp")
        user, campaign = ints((f[col["uid"]], f[col["campaign"]]))
        imp = schema.Impression(event_id=event_ids(NAME, path, n)[0], ts=ts, user_id=user, ad_id=0,
                                campaign_id=campaign, advertiser_id=0, domain="display",
                                cat=ints(f[j] for j in cats),
                                dense=[signed_log1p(float(f[col["time_since_last_click"]] or -1))])
        conv_ts = options.start_ts + 1000 * conv_s
        if attributed and conv_ts < ts:
            raise ValueError(f"conversion_timestamp {conv_s} before the impression's timestamp")
        return feedback(NAME, path, n, imp, click=click == 1, conversion=attributed == 1,
                        conversion_ts=conv_ts if attributed else None)

    return delimited_rows(path, NAME, convert, header=lambda f: f[0] == "timestamp", sep="\t")


def sniff(head: str) -> bool:
    return head.startswith("timestamp\tuid\tcampaign\t")


FORMAT = Format(NAME, read, sniff, (), "relative")
