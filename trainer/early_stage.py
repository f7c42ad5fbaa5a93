"""The multi-task early-stage ranker: a light two-tower model that ranks a large candidate set cheaply, so the
final ranker (:class:`trainer.model.MDMOModel`) re-ranks only its top K (the cascade of ``streamrec serve``,
``serving.cascade_k``; ``streamrec bench cascade`` measures it; docs in benchmarks/cascade.py).

Why multi-task (the multi-task early-stage ranking paper, ../shared/papers): an early stage trained on its own
objective (clicks) with cheaper features and another architecture than the final ranker disagrees with the
final about which ads are best, so the final's best ads are cut before it sees them (low recall). Trained on
the final stage's components -- click, conversion, *and the final ranker's own scores* -- from the same
examples, it passes the ads the final would pick.

Architecture (B rows, ``U = 4 + cat_slots`` user/context tables, 3 ad tables, ``K`` heads, ``d`` =
``early_stage_dim``, ``E`` = ``early_stage_emb_dim``, ``H`` = ``early_stage_hidden``)::

    user side  user_id, device, country, cat_*, history --emb--> (B, U*E) -+
               dense (B, dense_dim), domain emb (B, 8)                    -+- MLP(H) -> u (B, K, d+1)
    ad side    ad_id, campaign_id, advertiser_id --emb--> (B, 3*E) --------- MLP(H) -> a (B, K, d+1)
    logit_k = <u_k[:d], a_k[:d]> + u_k[d] + a_k[d] + domain_bias[domain, k]

The towers never see each other's inputs, so at serving the user tower runs once per request and only the
ad tower and a dot product run per candidate (:meth:`EarlyStageModel.rank`): the early stage's cost per
candidate is a small MLP over 3 embedding rows, against the final's cross layers, experts and gates over
every table. Position is not a feature (candidates are scored at position 0; the ranking must not depend on
it). The embeddings are their own (``early_stage_buckets`` rows per table, row-wise Adagrad at
``early_stage_lr_sparse``, :class:`trainer.embeddings.TorchEmbeddings`): ids are hashed exactly as the final's features
(:func:`trainer.features.hash_ids`), then taken modulo ``early_stage_buckets``.

Heads and losses (``tasks``):

* ``multi``: ``click``, ``cvr`` (ESMM over the labels, as the final ranker: :func:`trainer.model.esmm_loss`)
  and ``final_click``, ``final_cvr``: the final ranker's own logits on the same examples (scored before its
  update: the progressive predictions the loop publishes) as regression targets, ``early_stage_distill *
  MSE(logits)``; the cascade ranks by ``final_click`` (the final ranks by p_click). The logits, not the
  probabilities: the top of a candidate list sits where probabilities saturate, and a squared error on logits
  weighs the order there as much as in the middle.
* candidate pairs (``multi``, ``early_stage_pairs`` per example): the cascade ranks candidates retrieval hands
  it, not the ads that were shown, so the final's scores on shown ads alone teach the early stage little about
  the order among candidates (``bench cascade --quick``: recall 0.58, below the single-task 0.72). Each example's
  user and context are paired with ads drawn uniformly from the ``early_stage_pool`` most recent distinct ads,
  the final ranker scores the pairs (as it is after its step), and a group loss teaches the order within each
  group (the shown ad and its pairs: one user, one context): the squared error of the logits' deviations from
  the group mean, each ad weighted ``0.5 + 0.5 * (k+1) * softmax(final logits / tau)`` over its group (``tau``
  the spread of the final's deviations in the batch), so the ads the final ranks high count more: the cascade
  must keep the final's top. ``GROUP_WEIGHT`` against the pointwise terms. Measured (``bench cascade --quick``,
  60k examples): recall 0.575 with pointwise errors on the pairs, 0.883 with the unweighted group loss, 0.907
  with the top weighting (single-task 0.633 on the same requests); at 80k, with the rows' own learning rate
  ``early_stage_lr_sparse`` 0.15 (they must follow a moving final): 0.961 (single-task 0.741).
* ``click``: the single-task baseline of the same towers: one ``click`` head, BCE on clicks, ranks by it.

:class:`EarlyStage` owns the model and its optimizers (Adam for dense parameters, row-wise Adagrad for the
rows), trains with :meth:`EarlyStage.train_step` beside the final ranker (``trainer.early_stage``, the trainer
loop calls it after each final step), saves/loads its state for checkpoints, and its serving state goes into
every published model version (``early_stage.pt``, :func:`serving_files`; read back by
:func:`load_serving`/:func:`apply_serving`).
"""

from __future__ import annotations

import json
from collections import OrderedDict

import msgspec
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from config import TrainerConfig
from streams import schema
from streams.names import Stat
from trainer.embeddings import TorchEmbeddings, resolve_device
from trainer.features import FeatureBatch, hash_ids, table_names
from trainer.model import DOMAIN_DIM, esmm_loss, teacher_logits

TASKS = {"multi": ("click", "cvr", "final_click", "final_cvr"), "click": ("click",)}
RANK_HEAD = {"multi": "final_click", "click": "click"}
AD_TABLES = ("ad_id", "campaign_id", "advertiser_id")
STATE_VERSION = 1
# weight of the per-group order loss on candidate pairs (against 1 for the pointwise logit error): bench
# cascade --quick (60k examples, unweighted group loss), recall 0.883 at 4 and 0.863 at 16
GROUP_WEIGHT = 4.0


def user_tables(tcfg: TrainerConfig) -> list[int]:
    """Indices (in :func:`trainer.features.table_names` order) of the user/context tables the early stage reads."""
    names = table_names(tcfg)
    keep = {"user_id", "device", "country", "history", *(f"cat_{i}" for i in range(tcfg.cat_slots))}
    return [i for i, n in enumerate(names) if n in keep]


def ad_tables(tcfg: TrainerConfig) -> list[int]:
    names = table_names(tcfg)
    return [names.index(n) for n in AD_TABLES]


def select_tables(indices: np.ndarray, offsets: np.ndarray, num_tables: int, pick: list[int], buckets: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The TBE input of tables ``pick`` out of a batch's TBE input (``num_tables`` tables; see
    :mod:`trainer.features`), rows taken modulo ``buckets``.

    >>> idx = np.array([10, 11, 20, 30, 31, 32]); off = np.array([0, 1, 2, 3, 6])   # 2 tables x 2 bags
    >>> [a.tolist() for a in select_tables(idx, off, 2, [1], 25)]
    [[20, 5, 6, 7], [0, 1, 4]]
    """
    b = (len(offsets) - 1) // num_tables
    segs, lens = [], []
    for t in pick:
        lo, hi = offsets[t * b], offsets[(t + 1) * b]
        segs.append(indices[lo:hi])
        lens.append(np.diff(offsets[t * b:(t + 1) * b + 1]))
    out_off = np.zeros(len(pick) * b + 1, np.int64)
    np.cumsum(np.concatenate(lens) if lens else np.zeros(0, np.int64), out=out_off[1:])
    return np.concatenate(segs).astype(np.int64) % buckets, out_off


class EarlyStageModel(nn.Module):
    """See the module docstring. ``logits(...) -> (B, K)``; ``rank(...)`` one request's candidates."""

    def __init__(self, tcfg: TrainerConfig, device: torch.device, tasks: str):
        super().__init__()
        if tasks not in TASKS:
            raise ValueError(f"trainer.early_stage_tasks {tasks!r}: must be one of {', '.join(TASKS)}")
        self.tasks, self.heads = tasks, TASKS[tasks]
        self.rank_head = self.heads.index(RANK_HEAD[tasks])
        self.k, self.d = len(self.heads), tcfg.early_stage_dim
        self.user_idx, self.ad_idx = user_tables(tcfg), ad_tables(tcfg)
        self.buckets, e, h = tcfg.early_stage_buckets, tcfg.early_stage_emb_dim, tcfg.early_stage_hidden
        self.n_dom = len(schema.DOMAINS)
        lr = tcfg.early_stage_lr_sparse
        self.user_emb = TorchEmbeddings(len(self.user_idx), self.buckets, e, lr, device)
        self.ad_emb = TorchEmbeddings(len(self.ad_idx), self.buckets, e, lr, device)
        self.domain_emb = nn.Embedding(self.n_dom, DOMAIN_DIM, device=device)
        out = self.k * (self.d + 1)
        self.user_tower = nn.Sequential(nn.Linear(len(self.user_idx) * e + tcfg.dense_dim + DOMAIN_DIM, h,
                                                  device=device), nn.ReLU(), nn.Linear(h, out, device=device))
        self.ad_tower = nn.Sequential(nn.Linear(len(self.ad_idx) * e, h, device=device), nn.ReLU(),
                                      nn.Linear(h, out, device=device))
        self.domain_bias = nn.Embedding(self.n_dom, self.k, device=device)
        with torch.no_grad():
            self.domain_bias.weight.zero_()

    def user_vectors(self, u_idx: torch.Tensor, u_off: torch.Tensor, dense: torch.Tensor, domain: torch.Tensor
                     ) -> torch.Tensor:
        """(B, K, d+1) user-tower outputs; the last coordinate of each head is the user's bias (plus the
        domain's)."""
        x = torch.cat([self.user_emb(u_idx, u_off), dense, self.domain_emb(domain)], dim=1)
        u = self.user_tower(x).view(-1, self.k, self.d + 1)
        return torch.cat([u[:, :, :self.d], (u[:, :, self.d] + self.domain_bias(domain)).unsqueeze(-1)], dim=-1)

    def ad_vectors(self, a_idx: torch.Tensor, a_off: torch.Tensor) -> torch.Tensor:
        """(N, K, d+1) ad-tower outputs; the last coordinate of each head is the ad's bias."""
        return self.ad_tower(self.ad_emb(a_idx, a_off)).view(-1, self.k, self.d + 1)

    @staticmethod
    def combine(u: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """logits (B, K) of row-aligned user and ad vectors (or u broadcast over a: u (1, K, d+1))."""
        return (u[..., :-1] * a[..., :-1]).sum(-1) + u[..., -1] + a[..., -1]

    def logits(self, eb: "EarlyBatch") -> torch.Tensor:
        return self.combine(self.user_vectors(eb.u_idx, eb.u_off, eb.dense, eb.domain), self.ad_vectors(eb.a_idx,
                                                                                                        eb.a_off))

    @torch.no_grad()
    def rank(self, user: schema.Impression, ad_ids: np.ndarray, campaign_ids: np.ndarray,
             advertiser_ids: np.ndarray, tcfg: TrainerConfig) -> np.ndarray:
        """The ranking head's logits (N,) of one request's candidates (the request's user and context in
        ``user``; any ad fields of it are ignored): the user tower once, the ad tower per candidate."""
        dev = self.domain_emb.weight.device
        from trainer.features import featurize_impressions

        idx, off, dense, dom = featurize_impressions([user], tcfg)
        ui, uo = select_tables(idx, off, len(table_names(tcfg)), self.user_idx, self.buckets)
        u = self.user_vectors(torch.from_numpy(ui).to(dev), torch.from_numpy(uo).to(dev),
                              torch.from_numpy(dense).to(dev), torch.from_numpy(dom).to(dev))
        ai, ao = ad_inputs(ad_ids, campaign_ids, advertiser_ids, tcfg, self.buckets)
        a = self.ad_vectors(torch.from_numpy(ai).to(dev), torch.from_numpy(ao).to(dev))
        h = self.rank_head
        return self.combine(u[:, h], a[:, h]).float().cpu().numpy()

    @torch.no_grad()
    def score(self, eb: "EarlyBatch") -> np.ndarray:
        """The ranking head's logits (B,) of row-aligned examples or impressions."""
        return self.logits(eb)[:, self.rank_head].float().cpu().numpy()


def ad_inputs(ad_ids: np.ndarray, campaign_ids: np.ndarray, advertiser_ids: np.ndarray, tcfg: TrainerConfig,
              buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """TBE input (3 tables x N bags of one id) of the ad tower, hashed as :func:`trainer.features.featurize`
    hashes those fields (then modulo ``buckets``)."""
    n = len(ad_ids)
    ids = np.concatenate([np.asarray(x, dtype=np.uint64) for x in (ad_ids, campaign_ids, advertiser_ids)])
    tables = np.repeat(np.asarray(ad_tables(tcfg)), n)
    return hash_ids(ids, tables, tcfg.hash_buckets) % buckets, np.arange(3 * n + 1, dtype=np.int64)


def pair_tables(fb: FeatureBatch, tcfg: TrainerConfig, k: int, ad_ids: np.ndarray, campaign_ids: np.ndarray,
                advertiser_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The ``(indices, offsets, dense, domain)`` of ``k`` candidate pairs per row of ``fb`` (row ``n*k + j``:
    row ``n``'s user and context with ad ``n*k + j``; position 0), built from ``fb``'s arrays: every bag
    but the ad tables' and the position's repeated ``k`` times. Equal to featurizing the pairs as impressions
    (:meth:`EarlyStage.pair_impressions`; tests/test_cascade.py checks it)."""
    names = table_names(tcfg)
    b, t_all = fb.batch_size, len(names)
    n = b * k
    ad_t = {names.index(x): ids for x, ids in zip(AD_TABLES, (ad_ids, campaign_ids, advertiser_ids))}
    pos_t = names.index("position")
    segs, lens = [], []
    for t in range(t_all):
        if t in ad_t or t == pos_t:
            raw = ad_t[t] if t in ad_t else np.zeros(n, np.uint64)
            segs.append(hash_ids(np.asarray(raw, dtype=np.uint64), np.full(n, t), tcfg.hash_buckets))
            lens.append(np.ones(n, np.int64))
            continue
        lo = fb.offsets[t * b:(t + 1) * b]
        rl = np.repeat(np.diff(fb.offsets[t * b:(t + 1) * b + 1]), k)
        excl = np.cumsum(rl) - rl
        segs.append(fb.indices[np.repeat(np.repeat(lo, k) - excl, rl) + np.arange(int(rl.sum()))])
        lens.append(rl)
    offsets = np.zeros(t_all * n + 1, np.int64)
    np.cumsum(np.concatenate(lens), out=offsets[1:])
    return (np.concatenate(segs).astype(np.int64), offsets, np.repeat(fb.dense, k, axis=0),
            np.repeat(fb.domain, k))


class EarlyBatch:
    """The early stage's inputs of B rows on a device (user/context TBE input, dense, domain, ad TBE input)."""

    def __init__(self, fb_or_parts, tcfg: TrainerConfig, buckets: int, device: torch.device):
        idx, off, dense, dom = fb_or_parts
        t = len(table_names(tcfg))
        ui, uo = select_tables(idx, off, t, user_tables(tcfg), buckets)
        ai, ao = select_tables(idx, off, t, ad_tables(tcfg), buckets)
        to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
        self.u_idx, self.u_off, self.a_idx, self.a_off = to(ui), to(uo), to(ai), to(ao)
        self.dense, self.domain = to(dense), to(dom)

    @classmethod
    def of(cls, fb: FeatureBatch, tcfg: TrainerConfig, buckets: int, device: torch.device) -> "EarlyBatch":
        return cls((fb.indices, fb.offsets, fb.dense, fb.domain), tcfg, buckets, device)


class EarlyStage:
    """The early-stage model with its optimizers, trained beside the final ranker (see the module docstring).

    ``tasks``: ``multi`` or ``click`` (default ``tcfg.early_stage_tasks``). ``stats``: rows trained, summed
    label and distillation losses (for the trainer's logs and ServiceStats)."""

    def __init__(self, tcfg: TrainerConfig, tasks: str | None = None, device: torch.device | None = None):
        self.tcfg = tcfg
        self.tasks = tasks or tcfg.early_stage_tasks
        self.device = device if device is not None else resolve_device(tcfg.device)
        self.model = EarlyStageModel(tcfg, self.device, self.tasks)
        self.dense_params = [p for n, p in self.model.named_parameters() if not n.startswith(("user_emb.", "ad_emb."))]
        self.opt = torch.optim.Adam(self.dense_params, lr=tcfg.lr_dense)
        self.steps = 0
        self.stats = {"rows": 0, "label_loss_sum": 0.0, "distill_loss_sum": 0.0, "pair_rows": 0}
        # candidate pairs (multi-task, early_stage_pairs > 0): recent distinct ads, ad id -> (campaign, advertiser)
        self.pool: OrderedDict[int, tuple[int, int]] = OrderedDict()
        self.rng = np.random.default_rng(tcfg.seed + 17)

    def batch(self, fb: FeatureBatch) -> EarlyBatch:
        return EarlyBatch.of(fb, self.tcfg, self.model.buckets, self.device)

    def remember_ads(self, imps: list[schema.Impression]) -> None:
        """Add the impressions' ads to the pool of recent distinct ads (the oldest leave past
        ``early_stage_pool``)."""
        pool, cap = self.pool, self.tcfg.early_stage_pool
        for i in imps:
            pool[i.ad_id] = (i.campaign_id, i.advertiser_id)
            pool.move_to_end(i.ad_id)
        while len(pool) > cap:
            pool.popitem(last=False)

    def sample_ads(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``n`` ads drawn uniformly from the pool of recent ads (what retrieval would hand the cascade):
        (ad ids, campaign ids, advertiser ids) uint64, or None while the pool is empty."""
        if not self.pool:
            return None
        m = len(self.pool)
        ads = np.fromiter(self.pool.keys(), dtype=np.uint64, count=m)
        meta = np.array(list(self.pool.values()), dtype=np.uint64).reshape(m, 2)
        pick = self.rng.integers(0, m, n)
        return ads[pick], meta[pick, 0], meta[pick, 1]

    def pair_impressions(self, imps: list[schema.Impression], ads) -> list[schema.Impression]:
        """The candidate pairs as impressions: impression ``n``'s user and context with ads ``n*k .. n*k+k-1`` of
        ``ads`` (:meth:`sample_ads`), at position 0 (the slow path of :meth:`step_beside`; what
        :func:`pair_tables` builds from the feature arrays directly)."""
        k = self.tcfg.early_stage_pairs
        a, c, v = (x.tolist() for x in ads)
        rep = msgspec.structs.replace
        return [rep(imp, ad_id=a[j], campaign_id=c[j], advertiser_id=v[j], position=0)
                for n, imp in enumerate(imps) for j in range(n * k, (n + 1) * k)]

    def train_step(self, fb: FeatureBatch, final_p_click: np.ndarray | None = None,
                   final_p_conversion: np.ndarray | None = None, pairs: tuple | None = None) -> float:
        """Learn from ``fb`` (its labels; with ``multi``, also the final ranker's probabilities on the same rows,
        before the final's update: required). ``pairs``: ``(impressions, final p_click, final p_conversion)`` of
        candidate pairs the final scored (``parts``: their ``(indices, offsets, dense, domain)`` feature arrays,
        ``early_stage_pairs`` rows per example, example-major): more rows for the distillation loss (no labels).
        Returns the batch loss."""
        eb = self.batch(fb)
        lg = self.model.logits(eb)
        click = torch.from_numpy(fb.click).to(self.device)
        w = torch.from_numpy(fb.weight).to(self.device)
        if self.tasks == "click":
            label = (F.binary_cross_entropy_with_logits(lg[:, 0], click, reduction="none") * w).mean()
            distill = None
        else:
            if final_p_click is None or final_p_conversion is None:
                raise ValueError("the multi-task early stage learns the final ranker's scores: train_step needs "
                                 "final_p_click and final_p_conversion of the same rows")
            conv = torch.from_numpy(fb.conversion).to(self.device)
            label = esmm_loss(lg[:, 0], lg[:, 1], click, conv, w)
            target = teacher_logits(torch.from_numpy(np.asarray(final_p_click, np.float32)).to(self.device),
                                    torch.from_numpy(np.asarray(final_p_conversion, np.float32)).to(self.device))
            distill = ((lg[:, 2:4] - target).pow(2).sum(1) * w).mean()
            if pairs is not None and len(pairs[1]):
                parts, p_pc, p_pv = pairs
                pl = self.model.logits(EarlyBatch(parts, self.tcfg, self.model.buckets, self.device))
                p_t = teacher_logits(torch.from_numpy(np.asarray(p_pc, np.float32)).to(self.device),
                                     torch.from_numpy(np.asarray(p_pv, np.float32)).to(self.device))
                k = self.tcfg.early_stage_pairs
                # per request group (the shown ad + its k candidate pairs, one user and context): the squared
                # error of the logits' deviations from the group mean, the order among ads, whatever the offset
                gs = torch.cat([lg[:, 2:4].unsqueeze(1), pl[:, 2:4].view(-1, k, 2)], dim=1)  # (B, k+1, 2)
                gt = torch.cat([target.unsqueeze(1), p_t.view(-1, k, 2)], dim=1)
                gt_dev = gt - gt.mean(1, keepdim=True)
                dev = (gs - gs.mean(1, keepdim=True)) - gt_dev
                # ads the final ranks high in their group weigh more (the cascade must keep the final's top):
                # half uniform, half a softmax over the group at the temperature of the final's own spread
                tau = gt_dev.std(dim=(0, 1), keepdim=True).clamp_min(0.05)
                gw = 0.5 + 0.5 * (k + 1) * torch.softmax(gt / tau, dim=1)
                distill = distill + GROUP_WEIGHT * ((dev.pow(2) * gw).sum((1, 2)) * w).mean()
                self.stats["pair_rows"] += len(p_pc)
        loss = label if distill is None else label + self.tcfg.early_stage_distill * distill
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.model.user_emb.step()
        self.model.ad_emb.step()
        self.steps += 1
        n = fb.batch_size
        self.stats["rows"] += n
        self.stats["label_loss_sum"] += float(label.detach()) * n
        if distill is not None:
            self.stats["distill_loss_sum"] += float(distill.detach()) * n
        return float(loss.detach())

    def step_beside(self, final, fb: FeatureBatch, imps: list[schema.Impression], final_p_click: np.ndarray,
                    final_p_conversion: np.ndarray) -> float:
        """One step beside the final ranker ``final`` (a :class:`trainer.model.Learner` that just trained on
        ``fb``, the features of ``imps``, whose scores before that update are ``final_p_*``): the multi-task
        stage also learns the final's scores on candidate pairs (each impression's user and context with
        ``early_stage_pairs`` ads of :meth:`sample_ads`, scored by the final as it is now)."""
        if self.tasks == "click":
            return self.train_step(fb)
        self.remember_ads(imps)
        k = self.tcfg.early_stage_pairs
        ads = self.sample_ads(len(imps) * k) if k > 0 else None
        pairs = None if ads is None else self.score_pairs(final, fb, imps, ads)
        return self.train_step(fb, final_p_click, final_p_conversion, pairs)

    def score_pairs(self, final, fb: FeatureBatch, imps: list[schema.Impression], ads, fast: bool = True
                    ) -> tuple[tuple, np.ndarray, np.ndarray]:
        """The candidate pairs of ``imps`` (``fb`` their features) with ``ads`` (:meth:`sample_ads`), and the
        final ranker's scores of them: ``((indices, offsets, dense, domain), p_click, p_conversion)``. ``fast``:
        from ``fb``'s arrays (:func:`pair_tables`), unless the final reads LoopFM or SOLARIS inputs or semantic IDs, which only
        the impression path computes; else through impressions (:meth:`pair_impressions`)."""
        from trainer.features import TorchBatch, featurize_impressions, impression_batch

        tc, k = final.tcfg, self.tcfg.early_stage_pairs
        sids = getattr(final, "semantic_ids", None)
        if not fast or tc.loopfm or getattr(tc, "solaris", False) or tc.ad_id_features != "hash":
            # the impression path: LoopFM / SOLARIS inputs, and candidate ads coded by their semantic IDs
            p_imps = self.pair_impressions(imps, ads)
            parts = featurize_impressions(p_imps, tc, sids=sids)
            tb = impression_batch(p_imps, tc, final.device, final.user_view, final.loopfm_view, sids=sids)
        else:  # straight from the batch's feature arrays: no impressions built, no hashing of user fields
            parts = pair_tables(fb, tc, k, *ads)
            user = None
            if tc.user_model:
                users = np.repeat(np.fromiter((i.user_id for i in imps), np.int64, len(imps)), k)
                user = (final.user_view.features(users, ads[0].astype(np.int64)) if final.user_view is not None
                        else np.zeros((len(users), 2 * tc.user_dim), np.float32))
            dev = final.device
            to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)  # noqa: E731
            zeros = torch.zeros(len(parts[3]), device=dev)
            tb = TorchBatch(indices=to(parts[0]), offsets=to(parts[1]), dense=to(parts[2]), domain=to(parts[3]),
                            click=zeros, conversion=zeros, weight=zeros, num_tables=0, batch_size=len(parts[3]),
                            user=None if user is None else to(user.astype(np.float32)))
        with torch.no_grad():
            pc, pv = final.model(tb)
        return parts, pc.float().cpu().numpy(), pv.float().cpu().numpy()

    def take_stats(self) -> dict[str, float]:
        """For the trainer's ServiceStats: ``early_stage_rows`` (total), the mean label and distillation losses
        since the previous call (absent when nothing was trained since)."""
        st, last = self.stats, getattr(self, "_last_stats", {"rows": 0, "label_loss_sum": 0.0,
                                                                  "distill_loss_sum": 0.0})
        out = {Stat.EARLY_STAGE_ROWS.value: float(st["rows"]), Stat.EARLY_STAGE_PAIR_ROWS.value: float(st["pair_rows"])}
        n = st["rows"] - last["rows"]
        if n > 0:
            out[Stat.EARLY_STAGE_LABEL_LOSS.value] = (st["label_loss_sum"] - last["label_loss_sum"]) / n
            if self.tasks == "multi":
                out[Stat.EARLY_STAGE_DISTILL_LOSS.value] = (st["distill_loss_sum"] - last["distill_loss_sum"]) / n
        self._last_stats = dict(st)
        return out

    # ---- checkpoints ------------------------------------------------------------------------------
    def state(self) -> dict:
        """Everything to continue exactly (weights, optimizer states, steps)."""
        dense = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()
                 if not k.startswith(("user_emb.", "ad_emb."))}
        return {"version": STATE_VERSION, "tasks": self.tasks, "dense": dense, "opt": _cpu(self.opt.state_dict()),
                "user_emb": self.model.user_emb.export_state(), "ad_emb": self.model.ad_emb.export_state(),
                "steps": self.steps, "stats": dict(self.stats),
                "pool": torch.tensor([[a, c, v] for a, (c, v) in self.pool.items()], dtype=torch.int64).view(-1, 3),
                "rng": json.dumps(self.rng.bit_generator.state)}

    def load_state(self, st: dict) -> None:
        if st.get("version") != STATE_VERSION or st.get("tasks") != self.tasks:
            raise ValueError(f"checkpoint early stage: version {st.get('version')} tasks {st.get('tasks')!r}, this "
                             f"trainer has version {STATE_VERSION} tasks {self.tasks!r} (trainer.early_stage_tasks "
                             "changed?): start over (`streamrec train --fresh`)")
        try:
            self.model.load_state_dict(st["dense"], strict=False)
            self.model.user_emb.import_state(st["user_emb"])
            self.model.ad_emb.import_state(st["ad_emb"])
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"checkpoint early stage does not fit this model (trainer.early_stage_* knobs "
                             f"changed?): {str(e).splitlines()[0]}") from None
        self.opt.load_state_dict(st["opt"])
        self.steps = int(st["steps"])
        self.stats.update(st.get("stats", {}))
        self.pool = OrderedDict((int(a), (int(c), int(v))) for a, c, v in st["pool"].tolist())
        self.rng.bit_generator.state = json.loads(st["rng"])


def _cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu(v) for v in obj]
    return obj


# ---- published versions ------------------------------------------------------------------------------------
def serving_state(es: EarlyStage, full: bool) -> dict[str, torch.Tensor]:
    """The ``early_stage.pt`` of a published version: the tasks, dense weights, and the embedding rows: all of
    them (``full``, or when the rows' changes are unknown) or those trained since the previous version
    (``user_rows``/``user_vectors``, ``ad_rows``/``ad_vectors``). Change tracking starts at a full."""
    m = es.model
    dense = {"dense." + k: v.detach().cpu().clone() for k, v in m.state_dict().items()
             if not k.startswith(("user_emb.", "ad_emb."))}
    out: dict[str, torch.Tensor] = {"tasks": torch.tensor([list(TASKS).index(es.tasks)]), **dense}
    changes = None if full else (m.user_emb.take_changes(), m.ad_emb.take_changes())
    if changes is None or changes[0] is None or changes[1] is None:
        for name in ("user_emb", "ad_emb"):
            emb = getattr(m, name)
            emb.track_changes()
            out[name + "_weights"] = emb.export_state()["weights"]
        return out
    for name, ch in zip(("user_emb", "ad_emb"), changes):
        vecs, _ = getattr(m, name).serving_rows(ch.slots)
        out[name + "_rows"] = torch.from_numpy(ch.slots.astype(np.int64))
        out[name + "_vectors"] = vecs
    return out


def load_serving(st: dict, tcfg: TrainerConfig, device: torch.device, where: str = "early_stage.pt"
                 ) -> EarlyStageModel:
    """A serving :class:`EarlyStageModel` (eval mode) from a full ``early_stage.pt`` (ValueError if it does not
    fit ``tcfg``)."""
    tasks = list(TASKS)[int(st["tasks"][0])]
    m = EarlyStageModel(tcfg, device, tasks)
    m.eval()
    if "user_emb_weights" not in st:
        raise ValueError(f"{where}: a delta, not a full early stage")
    apply_serving(m, st, where)
    return m


@torch.no_grad()
def apply_serving(m: EarlyStageModel, st: dict, where: str = "early_stage.pt") -> None:
    """Apply an ``early_stage.pt`` (full or delta) to ``m`` in place (ValueError if it does not fit)."""
    dense = {k[len("dense."):]: v for k, v in st.items() if k.startswith("dense.")}
    try:
        missing, unexpected = m.load_state_dict(dense, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{where}: does not fit this early stage: {str(e).splitlines()[0]}") from None
    missing = [k for k in missing if not k.startswith(("user_emb.", "ad_emb."))]
    if missing or unexpected:
        raise ValueError(f"{where}: missing {missing}, unexpected {unexpected}")
    for name in ("user_emb", "ad_emb"):
        emb = getattr(m, name)
        n = emb.num_tables * emb.rows
        if name + "_weights" in st:
            w = st[name + "_weights"]
            if tuple(w.shape) != (emb.num_tables, emb.rows, emb.dim):
                raise ValueError(f"{where}: {name} of shape {tuple(w.shape)}, the model needs "
                                 f"{(emb.num_tables, emb.rows, emb.dim)}")
            emb.bag.weight.copy_(w.reshape(-1, emb.dim))
        else:
            rows, vecs = st[name + "_rows"], st[name + "_vectors"]
            if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= n or vecs.shape != (len(rows), emb.dim)):
                raise ValueError(f"{where}: {name} rows do not fit the model")
            emb.write_rows(rows.numpy(), vecs)


def rank_impressions(m: EarlyStageModel, tcfg: TrainerConfig, imps: list[schema.Impression]) -> np.ndarray:
    """The ranking head's logits (N,) of ONE request's candidates as impressions (the same user and context in
    every one, as :mod:`serving.batcher` builds them): the ad ids are read off the impressions, the user and
    context off the first."""
    n = len(imps)
    ad = np.fromiter((i.ad_id for i in imps), dtype=np.uint64, count=n)
    camp = np.fromiter((i.campaign_id for i in imps), dtype=np.uint64, count=n)
    adv = np.fromiter((i.advertiser_id for i in imps), dtype=np.uint64, count=n)
    return m.rank(imps[0], ad, camp, adv, tcfg)


def cascade_recall(final_scores: np.ndarray, early_scores: np.ndarray, top: int, keep: int) -> float:
    """The share of the final ranker's exact top ``top`` (by ``final_scores`` over all candidates) that the
    early stage keeps in its top ``keep`` (by ``early_scores``); ties broken by candidate order.

    >>> f = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    >>> cascade_recall(f, f, 2, 2), cascade_recall(f, -f, 2, 3), cascade_recall(f, np.array([0, 9, 8, 7, 1.0]), 2, 2)
    (1.0, 0.0, 0.5)
    """
    ref = np.argsort(-np.asarray(final_scores), kind="stable")[:top]
    kept = np.argsort(-np.asarray(early_scores), kind="stable")[:keep]
    return len(np.intersect1d(ref, kept)) / len(ref)
