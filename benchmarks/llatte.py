"""LLaTTE as the FM's user side: quality against sequence length and model size, and the lift LoopFM carries to
the VMs, on the sessions world (in-process: no broker, no dataflow).

The world (``streams.sources.sessions``, ``--world sessions``): each user has 4 long-term interests and
arrives in sessions whose intent (one interest plus a deviation that evolves within the session) drives the
click; ``Impression.history`` is the user's latest clicked ads. The oracle scores with the true intent; the
*average-taste oracle* scores with each user's mean interest in its place: the best a user-id embedding could
know. The gap between the two is what a sequence can bring.

Every run is *progressive* over one stream of examples (oracle labels, emission order): each batch is scored
before anything trains on it, the FM (the ranker, trainer.model's MDMO at the FM's size) trains, then the user
model (trainer/users/) scores and trains on the batch and folds it into its histories, and re-encodes the
users it touched (synchronously: a refresh after every batch). The FM reads ``[u, u * v_ad]`` of the user
model's newest vectors (``trainer.user_model``), exactly as the trainer does. Metrics on the second half of
the stream: the FM's click AUC and NE, and the user model's own click AUC (its score ``<u, v_ad>``).

1. **sequence length**: the user model (dim ``--dim``, 1 layer) with histories of 4 .. 64 events;
2. **model size**: dim 16 / 32 / 64 x 1 / 2 layers at the longest length;
   beside them the FM without a user model, and without it and without the history feature;
   curves fitted: ``AUC = a + b * log2(x)`` (``b``: points per doubling of length / of parameters);
3. **LoopFM**: the FM publishes its user and ad representations after each batch (``trainer.loopfm``; with its
   user model on, they carry the user model's vectors); VMs (one per group of domains, small tables, no user
   model) read them as features, as in ``bench transfer``: VM alone, VM + LoopFM of the FM without its user
   model, VM + LoopFM of the FM with it (the largest size and length).

Last line: ``value`` = the FM's click AUC lift in points from the user model at the largest size and length
over the FM without one (``baseline`` 0); ``curve_length`` / ``curve_size`` (AUC per point), the fitted slopes,
``loopfm_lift`` (VM + LoopFM with the FM's user model over without, pooled click AUC points).

    streamrec bench llatte [--quick] [--n 60000] [--lengths 4,8,16,32,64] [--sizes 16x1,32x1,64x1,16x2,32x2,64x2]

Measured (docs/users.md), 60k impressions: with the transformer-only user model the curve was flat (+0.03 AUC
points per doubling of the length, lift -0.06 points, its own click AUC 0.60-0.61); with the reader path
(trainer/users/model.py) the FM gains +3.61 points at the largest size, +0.65 points per doubling of the length
(0.704 at 4 events, 0.730 at 64), the size curve still flat (+0.03 per doubling of the parameters), the user
model's own click AUC 0.67-0.71; LoopFM carries it to the VMs: +4.07 points (VM + LoopFM 0.664 -> 0.705).
"""

from __future__ import annotations

import sys
import time
from functools import partial

import msgspec
import numpy as np
import torch

from benchmarks._common import parser, report
from benchmarks._simulated import example_stream, truth_arrays
from config import TrainerConfig
from embedding_store.ann import AnnConfig
from embedding_store.fm_embeddings import FMEmbeddingStore
from streams import schema
from streams.metrics import normalized_entropy, roc_auc
from streams.sources.generate import GeneratorConfig, TruthParams, simulate
from streams.sources.sessions import SESSIONS, oracles
from trainer.features import featurize
from trainer.loopfm import FMEmbeddingView, fm_embeddings, representation_dim
from trainer.model import Learner
from trainer.users.history import HistoryConfig
from trainer.users.model import UserModelConfig
from trainer.users.service import UserModelService, UserServiceConfig

BATCH = 256
DOMAINS = ("feed", "stories", "video", "search", "display")
# frequent clicks (as in bench quality / transfer) so that the stream teaches something in minutes
TRUTH = TruthParams(base_ctr={"feed": 0.2, "stories": 0.15, "video": 0.12, "search": 0.25, "display": 0.1},
                    base_cvr={"feed": 0.2, "stories": 0.15, "video": 0.15, "search": 0.25, "display": 0.1},
                    latent_scale=2.0, latent_dim=4)
# 2,000 users at 5 impressions/s of event time: a user comes back in several sessions (at least 30 min apart)
WORLD = {"n_users": 2000, "n_ads": 300, "truth": TRUTH, "domains": DOMAINS, "impressions_per_s": 5.0,
         "sessions": SESSIONS}
SEED = 31
# the FM: bigger tables, every feature (bench transfer's FM); its user model is the variable here
FM = TrainerConfig(role="fm", batch_size=BATCH, device="cpu", user_model=False, hash_buckets=50_000,
                   embedding_dim=16, history_len=8, cat_slots=4)
VM = TrainerConfig(role="vm", batch_size=BATCH, device="cpu", user_model=False, hash_buckets=10_000,
                   embedding_dim=8, history_len=2, cat_slots=2)
AD_BUCKETS = 20_011  # the user model's hashed ad rows (300 ads: few collisions)
# the user model learns slowly from a stream this short: at the service's defaults (lr 3e-3, one step per ranker
# batch of 256) the transformer-only model's own click AUC was 0.546 after 30k impressions; lr 1e-2 with 4 steps
# of 64 per ranker batch 0.590 (0.615 after 120k), at every length and width. The limit was the architecture:
# with the reader path (trainer/users/model.py: a weighted mean of the sequence's ad embeddings in the ad
# table's space, the transformer through a gain starting at 0) it is 0.675 after 30k (docs/users.md)
USER_LR, USER_BATCH = 1e-2, 64
VM_GROUPS: tuple[tuple[str, ...], ...] = (("feed",), ("stories",), ("video",), ("search", "display"))


def _imp_index(example_id: str) -> int:
    return int(example_id.rsplit("-", 1)[1])


def user_service(dim: int, layers: int, length: int, lr: float = USER_LR, seed: int = 0) -> UserModelService:
    """The user model of one point of the curve: ``dim`` wide, ``layers`` blocks, ``length`` events per user
    (histories keep as many), re-encoding touched users at every call (``refresh_every_s`` 0)."""
    return UserModelService(UserServiceConfig(
        model=UserModelConfig(dim=dim, layers=layers, max_len=length, ad_buckets=AD_BUCKETS, lr=lr),
        history=HistoryConfig(max_len=length), index=AnnConfig(dim=dim, kind="numpy"), refresh_every_s=0,
        seed=seed))


def user_model_params(dim: int, layers: int, length: int) -> int:
    """Parameters of the user model of that size (its tables included)."""
    from trainer.users.model import UserTower

    return sum(p.numel() for p in UserTower(UserModelConfig(dim=dim, layers=layers, max_len=length,
                                                            ad_buckets=AD_BUCKETS)).parameters())


class Run(msgspec.Struct):
    p_fm: np.ndarray  # the FM's progressive p_click per impression
    p_user: np.ndarray | None  # the user model's own progressive p_click (None without one)
    published: list[list[bytes]]  # the FM's LoopFM records after each batch
    params: int  # the user model's parameters (0 without one)
    seconds: float


def fm_run(exs: list[schema.Example], n: int, tc: TrainerConfig, size: tuple[int, int, int] | None,
           publish: bool = False, user_batch: int = USER_BATCH, user_lr: float = USER_LR) -> Run:
    """One progressive pass of the FM (``tc``) with the user model ``size`` = (dim, layers, length) or none; the
    user model trains on micro-batches of ``user_batch`` of each FM batch, at ``user_lr``."""
    t0 = time.perf_counter()
    if size is not None:
        dim, layers, length = size
        tc = msgspec.structs.replace(tc, user_model=True, user_dim=dim)
        svc = user_service(dim, layers, length, user_lr)
    else:
        svc = None
    fm = Learner(tc)
    if svc is not None:
        fm.user_view = svc.view
    p_fm, p_user = np.full(n, np.nan), np.full(n, np.nan) if svc is not None else None
    published: list[list[bytes]] = []
    for i in range(0, len(exs), BATCH):
        chunk = exs[i:i + BATCH]
        idx = [_imp_index(e.example_id) for e in chunk]
        p_fm[idx] = fm.train_step(featurize(chunk, tc, svc.view if svc is not None else None)).p_click
        if svc is not None:  # after the ranker trained on the batch (as the trainer's worker does)
            for j in range(0, len(chunk), user_batch):
                p_user[idx[j:j + user_batch]] = svc.process(chunk[j:j + user_batch])["p_click"]
        if publish:
            published.append([schema.encode(x) for x in fm_embeddings(fm, [e.impression for e in chunk])])
    params = sum(p.numel() for p in svc.model.tower.parameters()) if svc is not None else 0
    return Run(p_fm=p_fm, p_user=p_user, published=published, params=params, seconds=time.perf_counter() - t0)


def vm_run(exs: list[schema.Example], n: int, loopfm_dim: int | None, published: list[list[bytes]]) -> np.ndarray:
    """Every VM group over its domains' examples (progressive p_click per impression); with ``loopfm_dim`` the
    VMs read the FM's records published up to the batch before theirs (the FM trained through it)."""
    out = np.full(n, np.nan)
    for group in VM_GROUPS:
        tc = msgspec.structs.replace(VM, vm_domains=group, **({"loopfm": True, "loopfm_dim": loopfm_dim}
                                                              if loopfm_dim else {}))
        vm = Learner(tc)
        store = view = None
        applied = 0
        if loopfm_dim:
            store = FMEmbeddingStore(loopfm_dim, max_age_s=365 * 86_400.0)  # age plays no part in-process
            view = vm.loopfm_view = FMEmbeddingView(store)
        mine = [e for e in exs if e.impression.domain in group]
        for i in range(0, len(mine), BATCH):
            chunk = mine[i:i + BATCH]
            idx = [_imp_index(e.example_id) for e in chunk]
            if store is not None:
                known = min(idx) // BATCH  # the FM's batches wholly before this one's first impression
                while applied < min(known, len(published)):
                    for raw in published[applied]:
                        store.apply_raw(raw)
                    applied += 1
            out[idx] = vm.train_step(featurize(chunk, tc, None, view)).p_click
    return out


def fit_log2(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares ``y = a + b * log2(x)``: (a, b); (nan, nan) with fewer than 2 distinct x.

    >>> fit_log2([4, 8, 16], [0.70, 0.71, 0.72])
    (0.68, 0.01)
    """
    x = np.log2(np.asarray(xs, np.float64))
    if len(set(x.tolist())) < 2:
        return float("nan"), float("nan")
    b, a = np.polyfit(x, np.asarray(ys, np.float64), 1)
    return round(float(a), 6), round(float(b), 6)


def _m(truth: dict, p: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    m = mask & ~np.isnan(p)
    return roc_auc(truth["click"][m], p[m]), normalized_entropy(truth["click"][m], np.clip(p[m], 1e-6, 1 - 1e-6))


def _sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for s in text.split(","):
        d, _, l_ = s.partition("x")
        out.append((int(d), int(l_ or 1)))
    return out


def main() -> int:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=None, help="impressions (default 60000, quick 6000)")
    p.add_argument("--lengths", default=None, help="sequence lengths (default 4,8,16,32,64; quick 4,16)")
    p.add_argument("--sizes", default=None,
                   help="user model sizes DIMxLAYERS at the longest length (default 16x1,32x1,64x1,16x2,32x2,64x2; "
                        "quick 16x1,32x2)")
    p.add_argument("--dim", type=int, default=None, help="user model width of the length sweep (default 32, quick 16)")
    p.add_argument("--seed", type=int, default=0, help="added to the generator's seed (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    p.add_argument("--user-lr", type=float, default=USER_LR, help="the user model's learning rate (default %(default)s)")
    p.add_argument("--user-batch", type=int, default=USER_BATCH,
                   help="the user model's micro-batch within each FM batch of 256 (default %(default)s)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    n = a.n or (6000 if a.quick else 60_000)
    lengths = [int(x) for x in (a.lengths or ("4,16" if a.quick else "4,8,16,32,64")).split(",")]
    sizes = _sizes(a.sizes or ("16x1,32x2" if a.quick else "16x1,32x1,64x1,16x2,32x2,64x2"))
    dim = a.dim or (16 if a.quick else 32)
    longest = max(lengths)
    t_all = time.perf_counter()
    sim = simulate(GeneratorConfig(n_impressions=n, seed=SEED + a.seed, **WORLD))
    truth, exs = truth_arrays(sim), example_stream(sim, "oracle", elapsed_s=0)
    mask = truth["ts"] >= np.median(truth["ts"])
    o = oracles(sim)
    o2 = oracles(sim, mask)
    fm_run_ = partial(fm_run, user_batch=a.user_batch, user_lr=a.user_lr)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    rows: list[tuple[str, ...]] = []
    res: dict[str, tuple[float, float, float, int]] = {}

    def row(study: str, name: str, auc: float, ne: float, user_auc: float | None, params: int, s: float) -> None:
        rows.append((study, name, f"{auc:.4f}", f"{ne:.4f}", "" if user_auc is None else f"{user_auc:.4f}",
                     f"{params:,}" if params else "", f"{s:.0f}"))

    # the largest model (most parameters, at the longest length) publishes for LoopFM, as does the FM without one
    big = max(sizes, key=lambda s: user_model_params(s[0], s[1], longest))
    big_key = (big[0], big[1], longest)
    published: dict[str, list[list[bytes]]] = {}
    for name, tc in (("FM, no user model, no history feature", msgspec.structs.replace(FM, history_len=0)),
                     ("FM, no user model", FM)):
        r = fm_run_(exs, n, tc, None, publish=tc is FM)
        if tc is FM:
            published["off"] = r.published
        auc, ne = _m(truth, r.p_fm, mask)
        res[name] = (auc, ne, float("nan"), 0)
        row("baseline", name, auc, ne, None, 0, r.seconds)
        log(f"  {name}: {r.seconds:.1f} s")
    base = res["FM, no user model"][0]
    curve_len: dict[int, float] = {}
    curve_len_user: dict[int, float] = {}
    runs: dict[tuple[int, int, int], Run] = {}
    for L in lengths:
        r = runs[(dim, 1, L)] = fm_run_(exs, n, FM, (dim, 1, L))
        auc, ne = _m(truth, r.p_fm, mask)
        ua = _m(truth, r.p_user, mask)[0]
        curve_len[L], curve_len_user[L] = auc, ua
        row("1 length", f"FM + user model d{dim} x1, {L} events", auc, ne, ua, r.params, r.seconds)
        log(f"  length {L}: {r.seconds:.1f} s")
    curve_size: dict[str, float] = {}
    size_params: dict[str, int] = {}
    for d, layers in sizes:
        key = (d, layers, longest)
        r = runs.get(key) or fm_run_(exs, n, FM, key, publish=key == big_key)
        runs[key] = r
        if key == big_key:
            published["on"] = r.published or fm_run_(exs, n, FM, key, publish=True).published
        auc, ne = _m(truth, r.p_fm, mask)
        ua = _m(truth, r.p_user, mask)[0]
        curve_size[f"{d}x{layers}"], size_params[f"{d}x{layers}"] = auc, r.params
        row("2 size", f"FM + user model d{d} x{layers}, {longest} events", auc, ne, ua, r.params, r.seconds)
        log(f"  size {d}x{layers}: {r.seconds:.1f} s")
    row("oracle", "the user's average taste in the intent's place", o2["auc_average_taste"], o2["ne_average_taste"],
        None, 0, 0)
    row("oracle", "the true intent (the generator's p_click)", o2["auc_intent"], o2["ne_intent"], None, 0, 0)
    t0 = time.perf_counter()
    pub_off, pub_on = published["off"], published["on"]
    tc_on = msgspec.structs.replace(FM, user_model=True, user_dim=big[0])
    vms = {"VM alone": vm_run(exs, n, None, []),
           "VM + LoopFM (FM without user model)": vm_run(exs, n, representation_dim(FM), pub_off),
           f"VM + LoopFM (FM with user model d{big[0]} x{big[1]}, {longest} events)":
               vm_run(exs, n, representation_dim(tc_on), pub_on)}
    vm_auc = {}
    for name, pv in vms.items():
        auc, ne = _m(truth, pv, mask)
        vm_auc[name] = auc
        row("3 LoopFM", name, auc, ne, None, 0, 0)
    log(f"  LoopFM: {time.perf_counter() - t0:.1f} s")
    names = list(vms)
    loopfm_lift = 100 * (vm_auc[names[2]] - vm_auc[names[1]])
    a_len, b_len = fit_log2(list(curve_len), list(curve_len.values()))
    ps = [size_params[f"{d}x{ly}"] for d, ly in sizes]
    a_size, b_size = fit_log2(ps, list(curve_size.values()))
    big_auc = curve_size[f"{big[0]}x{big[1]}"]
    print(f"{n} impressions of the sessions world ({WORLD['n_users']} users, {WORLD['n_ads']} ads, "
          f"{SESSIONS.n_interests} interests), batch {BATCH}, progressive click AUC / NE on the second half; "
          f"oracle on the whole run {o['auc_intent']:.4f}, average taste {o['auc_average_taste']:.4f}; "
          f"fits AUC = a + b log2(x): length b = {100 * b_len:+.3f} points per doubling, size b = "
          f"{100 * b_size:+.3f} points per doubling of parameters; {time.perf_counter() - t_all:.0f} s")
    report("llatte", rows, ("study", "model", "AUC click", "NE click", "user model's own AUC", "user model params",
                            "s"),
           value=100 * (big_auc - base), unit="FM click AUC lift from the user model (points, largest size and "
                                              "length, over no user model)", baseline=0.0,
           fm_auc_no_user_model=round(base, 4), fm_auc_largest=round(big_auc, 4), largest=f"{big[0]}x{big[1]}",
           longest=longest,
           fm_auc_no_history=round(res["FM, no user model, no history feature"][0], 4),
           curve_length={str(k): round(v, 4) for k, v in curve_len.items()},
           curve_length_user_model={str(k): round(v, 4) for k, v in curve_len_user.items()},
           curve_size={k: round(v, 4) for k, v in curve_size.items()}, size_params=size_params,
           fit_length_points_per_doubling=round(100 * b_len, 3), fit_size_points_per_doubling=round(100 * b_size, 3),
           oracle_auc=round(o2["auc_intent"], 4), oracle_average_taste_auc=round(o2["auc_average_taste"], 4),
           vm_alone_auc=round(vm_auc[names[0]], 4), vm_loopfm_auc=round(vm_auc[names[1]], 4),
           vm_loopfm_user_model_auc=round(vm_auc[names[2]], 4), loopfm_lift=round(loopfm_lift, 3), n=n,
           seed=a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
