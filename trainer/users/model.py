"""A LLaTTE-style user model: a small transformer over the user's recent event sequence, trained online.

Each event of :class:`~trainer.users.history.Sequences` becomes one token::

    token = E_ad[hash(ad)] + E_action[action] + E_domain[domain] + E_gap[log2 bucket of gap_s] + E_pos[slot]

The user vector ``u`` (B, dim) is the sum of two paths::

    u = sqrt(dim) * sum_j w[gap bucket_j, action_j] * E_ad[ad_j] / n        (the reader)
      + g * LayerNorm(transformer(tokens)[USER])                            (the transformer, g = 0 at first)

The *reader* is a recency- and action-weighted mean of the sequence's ad embeddings, one learned weight
per (gap bucket, action) (all 1 at first; a weight may turn negative: a non-click pushes away): it lives in
the ad table's own space, so ``<u, E_ad[target]>`` is an item-to-item score from the first step. The
transformer (a learned ``[USER]`` token prepended, ``layers`` pre-norm blocks, ``dim`` wide, 2 heads) adds
what the order and the interplay of events say, through a gain ``g`` initialised at 0 (ReZero): it starts
silent and takes a share as it learns. Why: with the transformer alone (the first version) the user vector
lives in a space a random value/output projection maps the ads to, and the model had to learn that
alignment from the click stream before it could say anything: on ``bench llatte``'s world its click AUC was
0.59 after 30k impressions at any length, width or learning rate, where the reader alone reaches 0.675
(docs/users.md, "bench llatte"). The objective is click prediction for the next impression, scored against
the same ad table (tied, so the ads a user clicked and the ads they will click share a space)::

    logit = <u, E_ad[hash(target ad)]> / sqrt(dim) + b_ad[hash(target ad)] + b_domain[target domain]

A state written before the reader existed loads as the model it was (reader weights 0, ``g`` = 1).

Sparse tables (ads) train with SparseAdam, the rest with Adam. This is the upstream model of a two-stage
setup (LLaTTE): it runs on its own schedule, its vectors go to the ANN index and to the ranker as
features (``u`` and ``u * E_ad[target]``, LoopFM-style intermediate embeddings).

>>> import numpy as np
>>> from trainer.users.history import Sequences
>>> m = UserModel(UserModelConfig(dim=8, max_len=4, ad_buckets=100))
>>> s = Sequences(ad=np.array([[0, 3, 4, 5]]), action=np.array([[0, 1, 2, 1]]), domain=np.zeros((1, 4), int),
...               gap_s=np.array([[-1, 60, 30, 1]], np.float32), mask=np.array([[False, True, True, True]]))
>>> m.encode(s).shape, m.score(s, np.array([9]), np.array([0])).shape
((1, 8), (1,))
>>> loss = m.train_step(s, np.array([9]), np.array([0]), np.array([1.0]))
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from embedding_store.ids import splitmix64
from streams import schema
from trainer.users.history import ACTIONS, Sequences

GAP_BUCKETS = 24  # log2 seconds: 1 s .. ~97 days; bucket 0 = unknown time (prior entries)


@dataclass(frozen=True)
class UserModelConfig:
    """``dim`` user-vector width, ``layers`` transformer blocks, ``max_len`` tokens, ``ad_buckets`` hashed ad
    rows, ``lr`` Adam / SparseAdam learning rate."""

    dim: int = 32
    layers: int = 1
    max_len: int = 32
    ad_buckets: int = 100_003
    lr: float = 3e-3


def ad_rows(ad_ids: np.ndarray, buckets: int) -> np.ndarray:
    """Hashed row of each ad id: (N,) int64 in [0, buckets)."""
    return (splitmix64(np.asarray(ad_ids).astype(np.uint64) ^ np.uint64(0x5EED)) % np.uint64(buckets)).astype(np.int64)


def gap_buckets(gap_s: np.ndarray) -> np.ndarray:
    """-1 (unknown) -> 0; else 1 + floor(log2(1 + gap_s)), capped at GAP_BUCKETS - 1."""
    b = 1 + np.floor(np.log2(1.0 + np.maximum(gap_s, 0))).astype(np.int64)
    return np.where(gap_s < 0, 0, np.minimum(b, GAP_BUCKETS - 1))


class UserTower(nn.Module):
    """``encode(seq tensors) -> (B, dim)``; ``ad_vectors(rows) -> (B, dim)``; ``forward`` -> click logits (B,)."""

    def __init__(self, cfg: UserModelConfig):
        super().__init__()
        d = cfg.dim
        self.cfg = cfg
        self.ad = nn.Embedding(cfg.ad_buckets, d, sparse=True)
        self.ad_bias = nn.Embedding(cfg.ad_buckets, 1, sparse=True)
        nn.init.normal_(self.ad.weight, std=0.1)
        nn.init.zeros_(self.ad_bias.weight)
        self.action = nn.Embedding(len(ACTIONS), d)
        self.domain = nn.Embedding(len(schema.DOMAINS), d)
        self.gap = nn.Embedding(GAP_BUCKETS, d)
        self.pos = nn.Embedding(cfg.max_len + 1, d)
        self.user_token = nn.Parameter(torch.zeros(1, 1, d))
        self.domain_bias = nn.Embedding(len(schema.DOMAINS), 1)
        nn.init.zeros_(self.domain_bias.weight)
        layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=2 * d, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.out = nn.LayerNorm(d)
        # the reader: one weight per (gap bucket, action), all 1 at first (a plain mean of the sequence's ads)
        self.read = nn.Embedding(GAP_BUCKETS * len(ACTIONS), 1)
        nn.init.ones_(self.read.weight)
        self.tf_gain = nn.Parameter(torch.zeros(()))  # the transformer's share, 0 at first (ReZero)
        for e in (self.action, self.domain, self.gap, self.pos):  # small next to the ad embedding: ads carry taste
            nn.init.normal_(e.weight, std=0.02)
        self.scale = d ** -0.5  # u is layer-normed (norm ~sqrt(d)): keep the initial dot products small

    def encode(self, ad: torch.Tensor, action: torch.Tensor, domain: torch.Tensor, gap: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        """(B, L) int64 rows / codes, mask (B, L) bool -> user vectors (B, dim)."""
        b, L = ad.shape
        e = self.ad(ad)
        w = self.read(gap * len(ACTIONS) + action).squeeze(-1) * mask  # (B, L), 0 on padding
        reader = (e * w.unsqueeze(-1)).sum(1) * (self.cfg.dim ** 0.5 / mask.sum(1, keepdim=True).clamp(min=1))
        x = e + self.action(action) + self.domain(domain) + self.gap(gap)
        x = torch.cat([self.user_token.expand(b, 1, -1), x], dim=1) + self.pos.weight[: L + 1]  # (B, L+1, d)
        pad = torch.cat([torch.zeros(b, 1, dtype=torch.bool), ~mask], dim=1)  # True = ignore
        h = self.blocks(x, src_key_padding_mask=pad)
        return reader + self.tf_gain * self.out(h[:, 0])

    def ad_vectors(self, rows: torch.Tensor) -> torch.Tensor:
        return self.ad(rows)

    def forward(self, seq: dict[str, torch.Tensor], target_rows: torch.Tensor, target_domain: torch.Tensor
                ) -> torch.Tensor:
        u = self.encode(**seq)
        return ((u * self.ad(target_rows)).sum(-1) * self.scale + self.ad_bias(target_rows).squeeze(-1)
                + self.domain_bias(target_domain).squeeze(-1))


NEW_PARAMS = ("read.weight", "tf_gain")  # the reader path's parameters (absent from states written before it)


def _without_new_params(opt_state: dict, names: list[str], new: tuple[str, ...]) -> dict:
    """An Adam state written for the dense parameters ``names`` less ``new``, renumbered for ``names`` (the
    new parameters start with fresh moments)."""
    old_to_new = [j for j, k in enumerate(names) if k not in new]
    (group,) = opt_state["param_groups"]
    if len(group["params"]) != len(old_to_new):
        raise ValueError(f"UserModel.load_state: the checkpoint's optimiser has {len(group['params'])} dense "
                         f"parameters, expected {len(old_to_new)} (this model's without the reader)")
    return {"state": {old_to_new[int(i)]: v for i, v in opt_state["state"].items()},
            "param_groups": [{**group, "params": list(range(len(names)))}]}


class UserModel:
    """The tower, its optimisers and numpy in/out: ``encode``, ``ad_vectors``, ``score`` (never mutate),
    ``train_step``, ``state``/``load_state``."""

    def __init__(self, cfg: UserModelConfig = UserModelConfig(), seed: int = 0):
        if cfg.dim % 2 or cfg.layers < 1 or cfg.max_len < 1:
            raise ValueError(f"UserModelConfig: dim must be even, layers and max_len >= 1; got {cfg}")
        torch.manual_seed(seed)
        self.cfg = cfg
        self.tower = UserTower(cfg)
        sparse = [self.tower.ad.weight, self.tower.ad_bias.weight]
        named = [(k, p) for k, p in self.tower.named_parameters() if all(p is not s for s in sparse)]
        self._dense_names = [k for k, _ in named]
        dense = [p for _, p in named]
        self.opt_sparse = torch.optim.SparseAdam(sparse, lr=cfg.lr)
        self.opt_dense = torch.optim.Adam(dense, lr=cfg.lr)
        self.steps = 0

    def _seq(self, s: Sequences) -> dict[str, torch.Tensor]:
        L = self.cfg.max_len
        if s.ad.shape[1] > L:  # keep the most recent L
            s = Sequences(*(a[:, -L:] for a in (s.ad, s.action, s.domain, s.gap_s, s.mask)))
        return {"ad": torch.from_numpy(ad_rows(s.ad, self.cfg.ad_buckets)),
                "action": torch.from_numpy(np.asarray(s.action, np.int64)),
                "domain": torch.from_numpy(np.asarray(s.domain, np.int64)),
                "gap": torch.from_numpy(gap_buckets(s.gap_s)), "mask": torch.from_numpy(np.asarray(s.mask, bool))}

    def _target(self, ad_ids: np.ndarray, domains: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(ad_rows(ad_ids, self.cfg.ad_buckets)),
                torch.from_numpy(np.asarray(domains, np.int64)))

    @torch.no_grad()
    def encode(self, s: Sequences) -> np.ndarray:
        """User vectors (B, dim) float32."""
        self.tower.eval()
        return self.tower.encode(**self._seq(s)).numpy()

    @torch.no_grad()
    def ad_vectors(self, ad_ids: np.ndarray) -> np.ndarray:
        """The model's ad embeddings (B, dim): the other side of the click score."""
        return self.tower.ad_vectors(torch.from_numpy(ad_rows(ad_ids, self.cfg.ad_buckets))).numpy()

    @torch.no_grad()
    def score(self, s: Sequences, ad_ids: np.ndarray, domains: np.ndarray) -> np.ndarray:
        """P(click) of each (user sequence, target ad, domain): (B,) float32."""
        self.tower.eval()
        return torch.sigmoid(self.tower(self._seq(s), *self._target(ad_ids, domains))).numpy()

    def train_step(self, s: Sequences, ad_ids: np.ndarray, domains: np.ndarray, clicks: np.ndarray,
                   weight: np.ndarray | None = None) -> float:
        """One Adam step on weighted log loss; returns the loss."""
        self.tower.train()
        logits = self.tower(self._seq(s), *self._target(ad_ids, domains))
        y = torch.from_numpy(np.asarray(clicks, np.float32))
        w = None if weight is None else torch.from_numpy(np.asarray(weight, np.float32))
        loss = nn.functional.binary_cross_entropy_with_logits(logits, y, weight=w)
        self.opt_sparse.zero_grad(set_to_none=True)
        self.opt_dense.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_sparse.step()
        self.opt_dense.step()
        self.steps += 1
        return float(loss.detach())

    def state(self) -> dict:
        return {"config": asdict(self.cfg), "tower": self.tower.state_dict(), "opt_sparse": self.opt_sparse.state_dict(),
                "opt_dense": self.opt_dense.state_dict(), "steps": self.steps}

    def load_state(self, st: dict) -> None:
        if st["config"] != asdict(self.cfg):
            raise ValueError(f"UserModel.load_state: checkpoint config {st['config']} != this model's {asdict(self.cfg)}")
        tower, opt_dense = dict(st["tower"]), st["opt_dense"]
        if "read.weight" not in tower:  # written before the reader: load as the transformer alone it was
            tower["read.weight"] = torch.zeros_like(self.tower.read.weight)
            tower["tf_gain"] = torch.ones(())
            opt_dense = _without_new_params(opt_dense, self._dense_names, NEW_PARAMS)
        self.tower.load_state_dict(tower)
        self.opt_sparse.load_state_dict(st["opt_sparse"])
        self.opt_dense.load_state_dict(opt_dense)
        self.steps = int(st["steps"])
