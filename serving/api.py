"""The wire format of ``streamrec serve``: request and response structs, and the edge that turns request bytes
into a checked :class:`RankRequest` or a :class:`BadRequest` (status + reason), never an exception.

Validation happens once, here: types and ranges by msgspec (a wrong type, a negative id, an unknown field, a
NaN: 400), tokens by :data:`streams.schema.tokens_ok` (the request id becomes event ids downstream: 400),
domains against :data:`streams.schema.DOMAINS` (422), list lengths against ``serving.max_candidates`` (413).
Unknown users are not an error: a new user is scored with the rows its id hashes to.

>>> req = parse(b'{"user_id": 42, "domain": "feed", "candidates": [7, {"ad_id": 8, "campaign_id": 2, '
...             b'"advertiser_id": 1}]}', max_candidates=10)
>>> req.user_id, req.k, [c if isinstance(c, int) else c.ad_id for c in req.candidates]
(42, 10, [7, 8])
>>> parse(b'{"user_id": -1, "domain": "feed"}', max_candidates=10)
BadRequest(status=400, reason='Expected `int` >= 0 - at `$.user_id`')
>>> parse(b'{"user_id": 1, "domain": "moon"}', max_candidates=10).status
422
"""

from __future__ import annotations

import math
from typing import Annotated, Union

import msgspec

from streams import schema

# Structs use gc=False (they never form cycles): a service at 1000 requests/s of 100 candidates would otherwise
# hand the cyclic collector ~10^5 objects a second to track.
MAX_REQUEST_ID = 64
MAX_K = 1000


class Context(msgspec.Struct, frozen=True, gc=False, forbid_unknown_fields=True):
    """The request's context features (every field optional); they become the served impressions' fields."""

    device: schema.ShortStr = "other"
    country: schema.ShortStr = ""
    dense: Annotated[list[float], msgspec.Meta(max_length=schema.MAX_LIST)] = []
    cat: Annotated[list[schema.Id], msgspec.Meta(max_length=schema.MAX_LIST)] = []
    history: Annotated[list[schema.Id], msgspec.Meta(max_length=schema.MAX_LIST)] = []


class Candidate(msgspec.Struct, frozen=True, gc=False, forbid_unknown_fields=True):
    """A candidate ad; a missing campaign or advertiser comes from the catalogue of live ads."""

    ad_id: schema.Id
    campaign_id: schema.Id | None = None
    advertiser_id: schema.Id | None = None


class RankRequest(msgspec.Struct, frozen=True, gc=False, forbid_unknown_fields=True):
    """``POST /rank`` body. ``candidates``: objects or plain ad ids (metadata from the catalogue); absent:
    the service retrieves ``serving.retrieve_k``. ``ts``: event time in ms (default: now)."""

    user_id: schema.Id
    domain: Annotated[str, msgspec.Meta(max_length=32)]
    request_id: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_REQUEST_ID)] | None = None
    k: Annotated[int, msgspec.Meta(ge=1, le=MAX_K)] = 10
    context: Context = Context()
    candidates: list[Union[Candidate, schema.Id]] | None = None
    ts: schema.TsMs | None = None


class RankedAd(msgspec.Struct, frozen=True, gc=False):
    ad_id: int
    campaign_id: int
    advertiser_id: int
    position: int
    p_click: float
    p_conversion: float


class RankResponse(msgspec.Struct, frozen=True, gc=False):
    request_id: str
    arm: str
    model_version: int
    model_steps: int
    ads: list[RankedAd]
    took_ms: float


class Error(msgspec.Struct, frozen=True):
    error: str


class BadRequest(msgspec.Struct, frozen=True):
    """Why a request is refused: the HTTP status and the reason the client reads in ``{"error": reason}``."""

    status: int
    reason: str


_decoder = msgspec.json.Decoder(RankRequest)
encoder = msgspec.json.Encoder()


def parse(body: bytes, max_candidates: int) -> RankRequest | BadRequest:
    """Decode and check one ``/rank`` body; never raises on bad input."""
    try:
        req = _decoder.decode(body)
    except msgspec.ValidationError as e:
        return BadRequest(400, str(e))
    except schema.DECODE_ERRORS as e:
        return BadRequest(400, "malformed JSON: " + schema.unparseable(e).removeprefix("unparseable: "))
    if req.domain not in schema.DOMAIN_INDEX:
        return BadRequest(422, f"unknown domain {req.domain!r} (known: {', '.join(schema.DOMAINS)})")
    if req.candidates is not None and len(req.candidates) > max_candidates:
        return BadRequest(413, f"{len(req.candidates)} candidates, at most {max_candidates} allowed "
                               "(serving.max_candidates)")
    if req.candidates is not None and not req.candidates:
        return BadRequest(400, "candidates: an empty list (leave it out to have the service retrieve candidates)")
    ctx = req.context
    if not schema.tokens_ok((req.request_id or "") + ctx.device + ctx.country):
        bad = [n for n, v in (("request_id", req.request_id or ""), ("context.device", ctx.device),
                              ("context.country", ctx.country)) if not schema.tokens_ok(v)]
        return BadRequest(400, f"{', '.join(bad)}: only letters, digits and {schema.TOKEN_PUNCT} are allowed")
    if not all(map(math.isfinite, ctx.dense)):
        return BadRequest(400, "context.dense: a value is NaN or infinite")
    return req
