"""Taobao display-ad click data (Alimama, Tianchi 56): ``raw_sample`` rows, optionally joined with
``ad_feature``, ``user_profile`` and a clicked-ad sequence (reczoo/FuxiCTR layout).

Columns are found by header name. Required: ``clk``, ``time_stamp`` (unix seconds, or
``YYYY-MM-DD HH:MM:SS`` UTC), the user (``userid`` or raw ``user``) and ``adgroup_id``. Optional:
``campaign_id``, ``customer``, ``pid``, ``cate_id``, ``brand``, ``price``, the profile fields and
``click_sequence`` (``^``-separated adgroup ids).

Mapping: ``user_id = userid``, ``ad_id = adgroup_id``, ``campaign_id``, ``advertiser_id = customer``;
``domain = "display"``; ``history`` = ``click_sequence`` (its last 256 ids); ``cat`` = stable_id(pid),
cate_id, brand and the profile fields (missing -> 0); ``dense`` = [signed_log1p(price)];
``clk = 1`` -> Click at the impression's ts (the data has no click time).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from streams import schema
from streams.sources.formats import (Format, Item, ReadOptions, delimited_rows, event_ids, feedback, first_line, flags,
                                     ints, parse_time, signed_log1p, stable_id)

NAME = "taobao"
_CAT = ("cate_id", "brand", "cms_segid", "cms_group_id", "final_gender_code", "age_level", "pvalue_level",
        "shopping_level", "occupation", "new_user_class_level")


def read(path: Path, options: ReadOptions) -> Iterator[Item]:
    names = first_line(path).split(",")
    col = {c: i for i, c in enumerate(names)}
    user_col = col.get("userid", col.get("user"))
    if user_col is None or not {"clk", "time_stamp", "adgroup_id"} <= set(col):
        raise ValueError(f"{NAME}: {path.name} needs clk, time_stamp, userid (or user) and adgroup_id columns")
    opt = {c: col.get(c) for c in ("campaign_id", "customer", "pid", "price", "click_sequence")}
    cat_cols = [col[c] for c in _CAT if c in col]

    def get(f: list[str], name: str) -> str:
        j = opt[name]
        return f[j] if j is not None else ""

    def convert(f: list[str], n: int) -> tuple:
        clk = flags("clk", f[col["clk"]])[0]
        user, ad, camp, cust = ints((f[user_col], f[col["adgroup_id"]], get(f, "campaign_id"), get(f, "customer")))
        seq = get(f, "click_sequence")
        price = get(f, "price")
        imp = schema.Impression(event_id=event_ids(NAME, path, n)[0], ts=parse_time(f[col["time_stamp"]]),
                                user_id=user, ad_id=ad, campaign_id=camp, advertiser_id=cust, domain="display",
                                cat=[stable_id(get(f, "pid")), *ints(f[j] for j in cat_cols)],
                                dense=[signed_log1p(float(price))] if price else [],
                                history=ints(seq.split("^"))[-schema.MAX_LIST:] if seq else [])
        return feedback(NAME, path, n, imp, click=clk == 1, conversion=False)

    return delimited_rows(path, NAME, convert, header=lambda f: "time_stamp" in f)


def sniff(head: str) -> bool:
    names = head.split(",")
    return "time_stamp" in names and "adgroup_id" in names and "clk" in names


FORMAT = Format(NAME, read, sniff, (), "event")
