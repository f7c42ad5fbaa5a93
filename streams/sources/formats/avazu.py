"""Avazu mobile-ads CTR (Kaggle ``train.csv``): one impression per row, hourly timestamps.

Layout (CSV with header, 24 columns): ``id, click, hour (YYMMDDHH), C1, banner_pos, site_*, app_*,
device_id, device_ip, device_model, device_type, device_conn_type, C14..C21`` (``test.csv`` has no
``click``). Columns are found by header name.

Mapping:

* ``ts``: the hour (UTC) plus the row's index inside its hour in ms (capped at the hour's last ms), so
  rows stay in file order and inside their hour;
* ``user_id``: ``device_id``, or ``device_ip + device_model`` when ``device_id`` is Avazu's placeholder
  ``a99f214a`` (the usual reading in Kaggle solutions), hashed with ``stable_id``;
* ``ad_id = C14``, ``campaign_id = C17``, ``advertiser_id = C21`` -- an assumption: Avazu does not name its
  anonymous ``C*`` columns, these are the ones commonly read as creative / campaign / advertiser;
* ``position = banner_pos``; ``domain = "display"``; ``cat`` = stable_id of ``"<column>=<value>"`` for C1,
  site_*, app_*, device_model, device_type, device_conn_type, C15, C16, C18, C19, C20;
* ``click = 1`` -> Click at the impression's ts.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from streams import schema
from streams.sources.formats import (Format, Item, ReadOptions, delimited_rows, event_ids, feedback, first_line, flags,
                                     stable_id)

NAME = "avazu"
HOUR_MS = 3_600_000
UNKNOWN_DEVICE = "a99f214a"
_CAT = ("C1", "site_id", "site_domain", "site_category", "app_id", "app_domain", "app_category", "device_model",
        "device_type", "device_conn_type", "C15", "C16", "C18", "C19", "C20")


def hour_ms(text: str) -> int:
    """``YYMMDDHH`` -> ms since the epoch (UTC).

    >>> hour_ms("14102100")
    1413849600000
    """
    if len(text) != 8 or not text.isdigit():
        raise ValueError(f"hour must be YYMMDDHH, got {text!r}")
    dt = datetime(2000 + int(text[:2]), int(text[2:4]), int(text[4:6]), int(text[6:]), tzinfo=timezone.utc)
    return int(dt.timestamp() * 1000)


def read(path: Path, options: ReadOptions) -> Iterator[Item]:
    names = first_line(path).split(",")
    col = {c: i for i, c in enumerate(names)}
    need = {"hour", "device_id", "device_ip", "device_model", "C14", "C17", "C21", "banner_pos", *_CAT}
    if not need <= set(col):
        raise ValueError(f"{NAME}: {path.name} lacks columns {sorted(need - set(col))} in its header")
    cat_cols = [(c, col[c]) for c in _CAT]
    click_col = col.get("click")
    state = {"hour": None, "k": 0}

    def convert(f: list[str], n: int) -> tuple:
        h = hour_ms(f[col["hour"]])
        if h != state["hour"]:
            state["hour"], state["k"] = h, 0
        ts = h + min(state["k"], HOUR_MS - 1)
        state["k"] += 1
        click = flags("click", f[click_col])[0] if click_col is not None else 0
        dev = f[col["device_id"]]
        who = dev if dev != UNKNOWN_DEVICE else f"{f[col['device_ip']]}/{f[col['device_model']]}"
        imp = schema.Impression(event_id=event_ids(NAME, path, n)[0], ts=ts, user_id=stable_id(who),
                                ad_id=int(f[col["C14"]]), campaign_id=int(f[col["C17"]]),
                                advertiser_id=int(f[col["C21"]]), domain="display",
                                position=int(f[col["banner_pos"]]),
                                cat=[stable_id(f"{c}={f[j]}") for c, j in cat_cols])
        return feedback(NAME, path, n, imp, click=click == 1, conversion=False)

    return delimited_rows(path, NAME, convert, header=lambda f: f[0] == "id")


def sniff(head: str) -> bool:
    return head.startswith(("id,click,hour,", "id,hour,C1,"))


FORMAT = Format(NAME, read, sniff, (), "hourly")
