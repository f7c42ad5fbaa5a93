"""Taobao display-ad click data as preprocessed for DMR (Lyu et al., AAAI 2020; DeepCTR ``alimama_sample``).

Layout (CSV, header with repeated names, 267 columns, by position): 0-49 ``cont_btag`` (behaviour type,
0 = padding), 50-99 ``his_cate``, 100-149 ``his_brand``, 150-199 ``mask``, 200-249 ``match_mask``,
250 ``uid``, 251-258 profile fields, 259 ``mid`` (adgroup), 260 ``cate_id``, 261 ``campaign_id``,
262 ``customer``, 263 ``brand``, 264 ``price`` (normalised), 265 ``pid``, 266 ``target`` (click).

Mapping: ``user_id = uid``, ``ad_id = mid``, ``campaign_id``, ``advertiser_id = customer``,
``domain = "display"``; ``history`` = the behaviour sequence's categories ``his_cate`` where ``mask = 1``
(the sequence stores categories and brands, not ad ids; order kept); ``cat`` = cate_id, brand, pid and the
profile fields; ``dense`` = [price, number of behaviours]. No timestamps (dropped by the preprocessing):
``start_ts + i * row_interval_ms``. ``target = 1`` -> Click at the impression's ts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from streams import schema
from streams.sources.formats import Format, Item, ReadOptions, delimited_rows, event_ids, feedback, flags, ints

NAME = "taobao-dmr"
SEQ = 50
N_COLS = 5 * SEQ + 17


def read(path: Path, options: ReadOptions) -> Iterator[Item]:
    row = [0]

    def convert(f: list[str], n: int) -> tuple:
        i = row[0]
        row[0] += 1
        v = ints(f[:5 * SEQ + 16])  # every column but the label is a non-negative integer id / 0-1 flag
        target = flags("target", f[266])[0]
        cate, mask = v[SEQ:2 * SEQ], v[3 * SEQ:4 * SEQ]
        history = [c for c, m in zip(cate, mask) if m]
        uid, profile = v[250], v[251:259]
        mid, cate_id, campaign, customer, brand = v[259:264]
        imp = schema.Impression(event_id=event_ids(NAME, path, n)[0],
                                ts=options.start_ts + i * options.row_interval_ms, user_id=uid, ad_id=mid,
                                campaign_id=campaign, advertiser_id=customer, domain="display",
                                cat=[cate_id, brand, int(float(f[265])), *profile],
                                dense=[float(f[264]), float(len(history))], history=history)
        return feedback(NAME, path, n, imp, click=target == 1, conversion=False)

    return delimited_rows(path, NAME, convert, header=lambda f: f[0] == "cont_btag", expect=lambda _: {N_COLS})


def sniff(head: str) -> bool:
    return head.startswith("cont_btag,") and head.count(",") == N_COLS - 1


FORMAT = Format(NAME, read, sniff, (), "none")
