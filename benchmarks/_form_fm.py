"""A reference learner that knows the generator's functional form: how far can data alone take a learner?

:mod:`streams.sources.generate` draws ``logit p_click = base[domain] + user_bias + ad_bias + <U_user, A_ad> +
position effect + <w, dense> + sum of cat effects`` (and the same shape for the conversion). This model has
exactly those terms, one parameter set per objective (click; click-and-convert), on the trainer's own hashed
features: per-id biases of the ``user_id``, ``ad_id``, ``position`` and ``cat_*`` tables, a rank-8
user x ad factorisation, a linear dense term and a domain bias, learnt online with element-wise Adagrad and
scored before each update, like every model of ``bench quality``.

No real system knows the form of its traffic; what this learner still misses of the oracle's AUC is the
price of learning the hidden parameters from a stream of that length. ``bench quality`` shows it next to the
MDMO model so that a gap to the oracle can be read as data or as model.

>>> from config import TrainerConfig
>>> m = FormFM(TrainerConfig(hash_buckets=50, cat_slots=2, dense_dim=3))
>>> m.bias.shape, m.factors.shape   # (objectives * tables * rows), (objectives * 2 tables * rows, rank)
(torch.Size([1000, 1]), torch.Size([200, 8]))
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks._common import sparse_step
from streams import schema
from config import TrainerConfig
from trainer.features import FeatureBatch, table_names

RANK = 8  # the generator's latent_dim
BIAS_TABLES = ("user_id", "ad_id", "position")  # and every cat_* table


class FormFM:
    """``train_step(fb) -> (p_click (B,), p_conversion (B,))`` scored before the update; ``score(fb)``."""

    def __init__(self, tcfg: TrainerConfig, lr: float = 0.1, seed: int = 0):
        names = table_names(tcfg)
        self.t, self.rows = len(names), tcfg.hash_buckets
        self.bias_tables = torch.tensor([i for i, n in enumerate(names) if n in BIAS_TABLES or n.startswith("cat_")])
        self.user_t, self.ad_t = names.index("user_id"), names.index("ad_id")
        g = torch.Generator().manual_seed(seed)
        # objective k's rows follow objective k-1's: bias row (k, t, r), factor row (k, side, r)
        self.bias = torch.zeros(2 * self.t * self.rows, 1, requires_grad=True)
        self.factors = (0.01 * torch.randn(2 * 2 * self.rows, RANK, generator=g)).requires_grad_()
        self.dense_w = torch.zeros(2, tcfg.dense_dim, requires_grad=True)
        self.domain_b = torch.zeros(2, len(schema.DOMAINS), requires_grad=True)
        self.opt = torch.optim.Adagrad([self.bias, self.factors, self.dense_w, self.domain_b], lr=lr)

    def _logits(self, fb: FeatureBatch) -> torch.Tensor:
        """(2, B) logits."""
        b = fb.batch_size
        idx, off = torch.from_numpy(fb.indices), torch.from_numpy(fb.offsets)
        bag_table = torch.arange(self.t).repeat_interleave(b)  # table of bag t*B + e
        row_table = bag_table.repeat_interleave(off.diff())  # table of each id
        out = []
        for k in range(2):
            rows = (k * self.t + row_table) * self.rows + idx
            bias = F.embedding_bag(rows, self.bias, off[:-1], mode="sum", sparse=True).view(self.t, b)
            # user and ad are single-id bags: their row of the factor table, objective k's half
            u = idx[off[self.user_t * b:(self.user_t + 1) * b]] + (2 * k) * self.rows
            a = idx[off[self.ad_t * b:(self.ad_t + 1) * b]] + (2 * k + 1) * self.rows
            fac = F.embedding(torch.stack([u, a]), self.factors, sparse=True)  # (2, B, RANK)
            out.append(bias.index_select(0, self.bias_tables).sum(0) + (fac[0] * fac[1]).sum(-1)
                       + torch.from_numpy(fb.dense) @ self.dense_w[k] + self.domain_b[k, torch.from_numpy(fb.domain)])
        return torch.stack(out)

    @torch.no_grad()
    def score(self, fb: FeatureBatch) -> tuple[np.ndarray, np.ndarray]:
        p = torch.sigmoid(self._logits(fb)).numpy()
        return p[0], p[1]

    def train_step(self, fb: FeatureBatch) -> tuple[np.ndarray, np.ndarray]:
        logits = self._logits(fb)
        y = torch.from_numpy(np.stack([fb.click, fb.click * fb.conversion]))
        loss = F.binary_cross_entropy_with_logits(logits, y, weight=torch.from_numpy(fb.weight), reduction="sum")
        self.opt.zero_grad()
        loss.backward()
        sparse_step(self.opt)
        p = torch.sigmoid(logits.detach()).numpy()
        return p[0], p[1]
