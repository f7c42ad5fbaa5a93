"""The unified multi-domain multi-objective (MDMO) ranking model and its training step.

Architecture (B examples, T tables of D dims, ``dense_dim`` dense values, ``N_DOM`` domains, ``E`` experts,
2 objectives)::

    sparse ids --SparseEmbeddings--> (B, T*D) -+
    dense      --------------------> (B, dd)  -+-- concat x0 (B, F)
    domain     --nn.Embedding------> (B, 8)   -+
    user model --[u, u * v_ad]-----> (B, 2du) -+   (when trainer.users.model; trainer/users/features.py)
    LoopFM --[u, a, u * a, present]> (B, 3d+1) -+  (when trainer.loopfm: the FM's vectors; trainer/loopfm.py)
    SOLARIS --[l_c, l_v, present]--> (B, 3)    -+  (when trainer.solaris: the FM's cached pair logits, also a
                                                    linear term beside the shortcuts; trainer/solaris.py)
    x_{l+1} = x0 * (W_l x_l + b_l) + x_l, l < N_CROSS       DCNv2 cross layers (full rank), shared
    h  = relu(bottom(x)) (B, 128)                           shared bottom
    e  = relu(experts(h)) (B, E, 64)                        shared experts (MMoE)
    g  = softmax(gates(h)[domain]) (B, 2, E)                one input-dependent gate per (domain, objective)
    t  = g @ e (B, 2, 64)                                   objective towers' inputs
    [l_ctr, l_cvr] = <t, head_w> + head_b + bias[domain]    one head per objective, per-domain biases
                     + wide + FM                            shortcuts off the embeddings (:func:`_shortcuts`)
                     + dense_wide(dense)                    a linear term of the dense values
    p_click = sigmoid(l_ctr);  p_conversion = p_click * sigmoid(l_cvr)        (ESMM)

Every domain shares every weight except its gates and biases, so a small domain learns from the large ones
(the gates pick how much of each expert it uses per objective; they start uniform).

Loss (example-weighted means): ``w_click * BCE(p_click, click) + w_conv * BCE(p_click * p_cvr, conversion)``,
so the conversion head learns over the whole impression space (no sample-selection bias from training on
clicks only). The weights are the example's ``weight`` times the ES-DFM importance weights of
:mod:`trainer.delay` for examples of the ``elapsed`` label policy (1 for final labels).

Foundation-model distillation (ExFM; docs/transfer.md), when ``teacher_weight > 0`` and a batch carries teacher
predictions (:attr:`FeatureBatch.has_teacher`)::

    aux head            [l_ctr_aux, l_cvr_aux] = <t, aux.head_w> + aux.head_b + aux.bias[domain] + shortcuts
                        (its own heads on the shared towers and shortcuts: :meth:`MDMOModel.distill_logits`)
    student adapter     [a_ctr, a_cvr] = s[domain] * l_T + c[domain] + MLP([l_T, staleness, domain emb])
                        (:class:`StudentAdapter`, inside :class:`Learner`; trained on the true labels)
    loss = ESMM(serving; labels) + teacher_weight * ESMM(aux; soft targets sigmoid(a).detach(), rows with a teacher)

The serving head (what :meth:`MDMOModel.forward` returns, what progressive validation scores and what the serving
export and published versions hold) learns from the true labels only; the teacher reaches it through the shared
weights, so a stale or shifted teacher cannot bias it directly. ``aux_head=False`` is plain distillation: the
distillation loss on the serving head itself, with the raw teacher as the target (no adapter). The auxiliary head
(``aux.*`` parameters) and the adapter are training-only: checkpoints carry them, exports never do
(:func:`trainer.export.dense_state`).

Cohort-contrastive auxiliary learning (C2AL; trainer/cohorts.py, docs/cohorts.md), when ``tcfg.c2al``: one
auxiliary head per targeted cohort ``k`` on the shared click tower input, ``l_k = <t_click, c2al.head_w[k]> +
c2al.head_b[k]`` (:class:`C2ALHeads`), trained on ``y_k = click * [example in cohort k]``;
``loss += c2al_weight * mean_k BCE(l_k, y_k)``. Training only, like the auxiliary head (``c2al.*``).

:class:`Learner` owns the model and both optimizers (Adam for dense parameters; row-wise Adagrad for the
embeddings, fused into backward with fbgemm), the label-delay histograms, and exports/imports its complete
state for checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from streams import schema
from config import TrainerConfig
from trainer import delay
from trainer.embeddings import make_embeddings, resolve_backend, resolve_device
from trainer.features import FeatureBatch, TorchBatch, table_names

DOMAIN_DIM = 8
N_CROSS = 2
BOTTOM = 128
N_EXPERTS = 4
EXPERT_DIM = 64
N_OBJ = len(schema.OBJECTIVES)
PROB_EPS = 1e-7
# what the numbers of a checkpoint mean; 2: the FM across the two sides, the dense linear term and the
# soft_log dense transform (a version-1 state would load into the same shapes with other semantics)
MODEL_VERSION = 2
# the user side of the FM shortcut's user x (ad, context) interaction; every other table is on the other side
USER_SIDE = ("user_id", "device", "country", "history")
# training-only parameters: the auxiliary distillation head (never in a serving export or published version)
TRAINING_ONLY_PREFIX = "aux."
C2AL_PREFIX = "c2al."  # the C2AL cohort heads: training only as well
C2AL_FM = True  # C2AL heads read the shared embeddings through an FM of their own (C2ALHeads)
ADAPTER_HIDDEN = 16
ADAPTER_LR = 1e-2  # the adapter is tiny and must follow the stream's shift quickly
SOLARIS_IN = 3  # [logit p_click, logit p_cvr, present] of the FM's cached pair prediction (trainer/solaris.py)
SOLARIS_LR = 1e-2  # Adam's learning rate of SOLARIS's linear term (as the student adapter's)
TEACHER_LOGIT_CLIP = 9.0  # teacher probabilities are clipped to sigmoid(+-9) before taking logits
STALE_SCALE = 8.0  # staleness features: log1p(age s) / 8, log1p(version gap) / 8 (~1 for hours / 3000 steps)


class AuxHead(nn.Module):
    """The auxiliary (distillation) head: per-objective weights over the shared towers, a bias and per-domain
    biases, like the serving head's but its own, plus the shared shortcut terms (wide + FM off the embeddings,
    the dense linear term). Trained only by the distillation loss.

    The shortcuts are where this model learns most at small data, so they are where the teacher's knowledge
    reaches the serving head: with them detached from the auxiliary head (the teacher shaping only the deep
    towers) ``bench transfer`` measured no transfer at all (pooled ratio -0.04 against +0.13 with them).
    """

    def __init__(self, n_dom: int, device: torch.device):
        super().__init__()
        self.head_w = nn.Parameter(torch.empty(N_OBJ, EXPERT_DIM, device=device))
        self.head_b = nn.Parameter(torch.zeros(N_OBJ, device=device))
        self.domain_bias = nn.Embedding(n_dom, N_OBJ, device=device)
        with torch.no_grad():
            nn.init.uniform_(self.head_w, -EXPERT_DIM ** -0.5, EXPERT_DIM ** -0.5)
            self.domain_bias.weight.zero_()

    def forward(self, t: torch.Tensor, domain: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
        return (t * self.head_w).sum(-1) + self.head_b + self.domain_bias(domain) + shared


class C2ALHeads(nn.Module):
    """C2AL's auxiliary heads (module docstring): ``K`` logits, each over the click tower's input ``t[:, 0]``
    (the shared representation every domain's click head reads) and, with ``fm``, an FM of its own over the
    shared embeddings: ``(v_user P_k) . v_ad`` with the user-side and ad/context-side sums of the FM shortcut
    (:func:`_shortcuts`) and a (D', D') matrix ``P_k`` per head, starting as the identity (the main FM). The
    FM term is where C2AL acts in the paper (the FM's shared embedding selection): a cohort's head can only
    fit its clicks if the shared embeddings carry that cohort's user x ad interactions, which the majority's
    gradient lets fade. Not the main FM itself: it has no parameters of its own, so a cohort label on it would
    pull every embedding toward "0 outside the cohort", against the main task."""

    def __init__(self, k: int, fm_dim: int, device: torch.device, *, fm: bool = True):
        super().__init__()
        self.head_w = nn.Parameter(torch.empty(k, EXPERT_DIM, device=device))
        self.head_b = nn.Parameter(torch.zeros(k, device=device))
        self.fm_proj = nn.Parameter(torch.eye(fm_dim, device=device).repeat(k, 1, 1)) if fm else None
        with torch.no_grad():
            nn.init.uniform_(self.head_w, -EXPERT_DIM ** -0.5, EXPERT_DIM ** -0.5)

    def forward(self, t: torch.Tensor, vu: torch.Tensor, va: torch.Tensor) -> torch.Tensor:
        out = t[:, 0] @ self.head_w.T + self.head_b  # (B, K)
        if self.fm_proj is not None:
            out = out + torch.einsum("bd,kde,be->bk", vu, self.fm_proj, va)
        return out


class StudentAdapter(nn.Module):
    """Maps the teacher's logits, its staleness and the example's domain to corrected logits (B, 2).

    Input per example: ``l_T`` = (logit p_click, logit p_cvr) of the teacher (p_cvr = p_conversion / p_click),
    staleness (log1p of the prediction's age in s and of the FM version gap, over :data:`STALE_SCALE`) and a
    domain embedding. Output: ``s[domain] * l_T + c[domain] + MLP(input)``, starting as the identity
    (s = 1, c = 0, the MLP's last layer 0), so an untrained adapter passes the teacher through. The per-domain
    affine part undoes a teacher that is systematically off for a domain (miscalibrated, shifted by drift); the
    MLP lets the correction depend on staleness (a stale teacher after a drift deserves a smaller slope).
    Trained on the true labels (ESMM loss) with its own Adam (:data:`ADAPTER_LR`).
    """

    def __init__(self, n_dom: int, device: torch.device):
        super().__init__()
        self.scale = nn.Embedding(n_dom, N_OBJ, device=device)
        self.shift = nn.Embedding(n_dom, N_OBJ, device=device)
        self.domain_emb = nn.Embedding(n_dom, 4, device=device)
        self.mlp = nn.Sequential(nn.Linear(N_OBJ + 2 + 4 + N_OBJ * 2, ADAPTER_HIDDEN, device=device), nn.ReLU(),
                                 nn.Linear(ADAPTER_HIDDEN, N_OBJ, device=device))
        with torch.no_grad():
            self.scale.weight.fill_(1.0)
            self.shift.weight.zero_()
            self.mlp[2].weight.zero_()
            self.mlp[2].bias.zero_()

    def forward(self, l_t: torch.Tensor, stale: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        # the teacher's logits times each staleness feature: the slope may shrink as the teacher ages
        inter = (l_t.unsqueeze(-1) * stale.unsqueeze(1)).flatten(1) / TEACHER_LOGIT_CLIP
        x = torch.cat([l_t / TEACHER_LOGIT_CLIP, stale, self.domain_emb(domain), inter], dim=1)
        return self.scale(domain) * l_t + self.shift(domain) + self.mlp(x)


def teacher_logits(p_click: torch.Tensor, p_conversion: torch.Tensor) -> torch.Tensor:
    """(B, 2) logits (click, post-click conversion) of the teacher's probabilities, clipped.

    >>> [[round(x, 3) for x in r] for r in teacher_logits(torch.tensor([0.5, 0.2]), torch.tensor([0.25, 0.0])).tolist()]
    [[0.0, 0.0], [-1.386, -9.0]]
    """
    lo = torch.sigmoid(torch.tensor(-TEACHER_LOGIT_CLIP))
    pc = p_click.clamp(lo, 1 - lo)
    pv = (p_conversion / pc).clamp(lo, 1 - lo)
    return torch.stack([torch.logit(pc), torch.logit(pv)], dim=1)


class MDMOModel(nn.Module):
    """See the module docstring. ``forward(batch) -> (p_click (B,), p_conversion (B,))``."""

    def __init__(self, tcfg: TrainerConfig, backend: str, device: torch.device, *, aux_head: bool = False,
                 c2al_heads: int = 0):
        super().__init__()
        self.n_dom = len(schema.DOMAINS)
        self.num_tables = len(table_names(tcfg))
        self.emb = make_embeddings(backend, self.num_tables, tcfg.hash_buckets, tcfg.embedding_dim,
                                   tcfg.lr_sparse, device, fiited=tcfg.fiited)
        self.domain_emb = nn.Embedding(self.n_dom, DOMAIN_DIM, device=device)
        self.user_in = 2 * tcfg.user_dim if tcfg.user_model else 0  # [u, u * v_ad] (trainer/users/features.py)
        self.loopfm_in = 3 * tcfg.loopfm_dim + 1 if tcfg.loopfm else 0  # [u_fm, a_fm, u_fm * a_fm, present]
        if self.loopfm_in:  # the FM's partial logit read off its vectors (see _loopfm_shortcut), per objective
            self.loopfm_first = nn.Parameter(torch.full((N_OBJ,), LOOPFM_FIRST_INIT, device=device))
            self.loopfm_inter = nn.Parameter(torch.ones(N_OBJ, device=device))
            # running means of the two terms over rows with vectors (first-order per objective, interaction)
            self.register_buffer("loopfm_mean", torch.zeros(N_OBJ + 1, device=device))
            self.register_buffer("loopfm_seen", torch.zeros((), device=device))
        # SOLARIS: the FM's cached prediction of the (user, ad) pair [logit p_click, logit p_cvr, present]
        self.solaris_in = SOLARIS_IN if tcfg.solaris else 0
        if self.solaris_in:  # running means of the cached logits over hits (see _solaris_centred)
            self.register_buffer("solaris_mean", torch.zeros(SOLARIS_IN - 1, device=device))
            self.register_buffer("solaris_seen", torch.zeros((), device=device))
        f = (self.num_tables * tcfg.embedding_dim + tcfg.dense_dim + DOMAIN_DIM + self.user_in + self.loopfm_in
             + self.solaris_in)
        self.cross = nn.ModuleList(nn.Linear(f, f, device=device) for _ in range(N_CROSS))
        self.bottom = nn.Linear(f, BOTTOM, device=device)
        self.experts = nn.Linear(BOTTOM, N_EXPERTS * EXPERT_DIM, device=device)
        self.gates = nn.Linear(BOTTOM, self.n_dom * N_OBJ * N_EXPERTS, device=device)
        self.head_w = nn.Parameter(torch.empty(N_OBJ, EXPERT_DIM, device=device))
        self.head_b = nn.Parameter(torch.zeros(N_OBJ, device=device))
        self.domain_bias = nn.Embedding(self.n_dom, N_OBJ, device=device)
        self.dense_wide = nn.Linear(tcfg.dense_dim, N_OBJ, bias=False, device=device)
        # SOLARIS: the FM's pair logits also as a linear term, starting as the identity (the VM passes the FM's
        # prediction through from its first step, its own parts learn what to add) with its own learning rate
        # (SOLARIS_LR: at lr_dense a scalar weight moves ~1e-3 a step, and a VM sees a few hundred steps)
        self.solaris_wide = nn.Linear(SOLARIS_IN, N_OBJ, bias=False, device=device) if self.solaris_in else None
        self.register_buffer("user_side", torch.tensor(
            [i for i, name in enumerate(table_names(tcfg)) if name in USER_SIDE], device=device), persistent=False)
        with torch.no_grad():  # domain-aware parts start neutral: uniform gates, bias 0
            nn.init.uniform_(self.head_w, -EXPERT_DIM ** -0.5, EXPERT_DIM ** -0.5)
            self.gates.weight.zero_()
            self.gates.bias.zero_()
            self.domain_bias.weight.zero_()
            self.dense_wide.weight.zero_()
            if self.solaris_wide is not None:  # starts passing the FM's logits through: [l_c, l_v] -> [ctr, cvr]
                self.solaris_wide.weight.zero_()
                self.solaris_wide.weight[0, 0] = 1.0
                self.solaris_wide.weight[1, 1] = 1.0
            for c in self.cross:
                c.weight.mul_(0.1)
        # the distillation head (training only: a serving model is built without it)
        self.aux = AuxHead(self.n_dom, device) if aux_head else None
        # C2AL's cohort heads (training only, like aux)
        self.c2al = (C2ALHeads(c2al_heads, tcfg.embedding_dim - N_OBJ, device, fm=C2AL_FM) if c2al_heads
                     else None)

    def _trunk(self, b: TorchBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The shared part: the towers' inputs t (B, 2, EXPERT_DIM) and the shortcut terms (B, 2)."""
        t, shared, _ = self._trunk_e(b)
        return t, shared

    def _trunk_e(self, b: TorchBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`_trunk` and the pooled embeddings (B, T, D) it read."""
        parts = [self.emb(b.indices, b.offsets), b.dense, self.domain_emb(b.domain)]
        if self.user_in:
            parts.append(b.user if b.user is not None else b.dense.new_zeros(b.dense.shape[0], self.user_in))
        lf = sol = None
        if self.loopfm_in:
            lf = b.loopfm if b.loopfm is not None else b.dense.new_zeros(b.dense.shape[0], self.loopfm_in)
            parts.append(lf)
        if self.solaris_in:
            sol = b.solaris if b.solaris is not None else b.dense.new_zeros(b.dense.shape[0], self.solaris_in)
            parts.append(sol)
        x0 = torch.cat(parts, dim=1)
        x = x0
        for c in self.cross:
            x = torch.addcmul(x, x0, c(x))  # x0 * (W x + b) + x in one op
        h = F.relu(self.bottom(x))
        n = h.shape[0]
        e = F.relu(self.experts(h)).view(n, N_EXPERTS, EXPERT_DIM)
        # each example needs only its own domain's gates: gather (B, 2*E) out of (B, N_DOM, 2*E)
        g = self.gates(h).view(n, self.n_dom, N_OBJ * N_EXPERTS)
        g = g.gather(1, b.domain.view(n, 1, 1).expand(n, 1, N_OBJ * N_EXPERTS)).view(n, N_OBJ, N_EXPERTS)
        t = torch.bmm(torch.softmax(g, dim=-1), e)  # (B, 2, EXPERT_DIM)
        e = parts[0].view(n, self.num_tables, -1)
        shared = _shortcuts(e, self.user_side) + self.dense_wide(b.dense)
        if self.loopfm_in:
            shared = shared + self._loopfm_shortcut(lf)
        if sol is not None:
            shared = shared + self.solaris_wide(self._solaris_centred(sol))
        return t, shared, e

    def _solaris_centred(self, sol: torch.Tensor) -> torch.Tensor:
        """``[l_c, l_v, present]`` with the FM's logits centred on their running means over hits, zero on misses.

        Uncentred, a hit adds the FM's whole logit (its intercept included) and a miss adds nothing, so the VM's
        one intercept is wrong for one of the two: measured (bench transfer --quick, targeting world) the SOLARIS
        VM scored 0.5844 on misses against VM alone's 0.5978 on the same requests, and kept none of the
        on-demand gain (-0.07). The running means update in training only, like LoopFM's."""
        present = sol[:, -1:]
        x = sol[:, :-1]
        if torch.is_grad_enabled():
            with torch.no_grad():
                n = present.sum()
                if n > 0:
                    self.solaris_seen.add_(n)
                    w = torch.clamp(n / self.solaris_seen, min=LOOPFM_MEAN_MOMENTUM)
                    self.solaris_mean.lerp_((x * present).sum(0) / n, w)
        return torch.cat([(x - self.solaris_mean) * present, present], 1)

    def _loopfm_shortcut(self, lf: torch.Tensor) -> torch.Tensor:
        """The FM's own wide and FM terms over the user and ad sides, read off its published vectors (B, 2).

        ``lf`` = ``[u_fm, a_fm, u_fm * a_fm, present]`` (trainer/loopfm.py): coordinates ``[0, N_OBJ)`` of each
        side are the FM's first-order weights, the rest its factors (and, with its user model, the user
        model's vectors), so ``u_fm[:N_OBJ] + a_fm[:N_OBJ] + sum(u_fm * a_fm)[N_OBJ:]`` is the part of the
        FM's shortcut logit (:func:`_shortcuts`) that the user and the ad carry. Scaled per objective by
        ``loopfm_first`` and ``loopfm_inter`` (the VM starts from the FM's reading of the pair and learns how far
        to trust it: the interaction at 1, the first-order weights at :data:`LOOPFM_FIRST_INIT`), each centred on its running mean over the rows that had vectors (the
        FM's intercepts live in its head and domain biases, not in the vectors: uncentred, the VM's NE went
        from 0.965 to 0.984 while its own biases caught up at the dense learning rate); zero where a side is
        missing or stale.
        Through the cross layers and towers alone the VM needed ~10x the examples to make use of the vectors
        (bench transfer: LoopFM's ratio -0.04 at 20k impressions, 0.24-0.32 at 150k)."""
        d = (lf.shape[1] - 1) // 3
        present = lf[:, -1:]
        x = torch.cat([lf[:, :N_OBJ] + lf[:, d:d + N_OBJ], lf[:, 2 * d + N_OBJ:3 * d].sum(1, keepdim=True)], 1)
        if torch.is_grad_enabled():  # training: update the running means (scoring reads them only)
            with torch.no_grad():
                n = present.sum()
                if n > 0:
                    self.loopfm_seen.add_(n)
                    w = torch.clamp(n / self.loopfm_seen, min=LOOPFM_MEAN_MOMENTUM)
                    self.loopfm_mean.lerp_((x * present).sum(0) / n, w)
        x = (x - self.loopfm_mean) * present
        return x[:, :N_OBJ] * self.loopfm_first + x[:, N_OBJ:] * self.loopfm_inter

    def _serving(self, t: torch.Tensor, shared: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        return (t * self.head_w).sum(-1) + self.head_b + self.domain_bias(domain) + shared

    def logits(self, b: TorchBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(l_ctr (B,), l_cvr (B,)) of the serving head."""
        t, shared = self._trunk(b)
        out = self._serving(t, shared, b.domain)
        return out[:, 0], out[:, 1]

    def distill_logits(self, b: TorchBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(l_ctr_aux (B,), l_cvr_aux (B,)) of the auxiliary head (a model built with ``aux_head=True``)."""
        if self.aux is None:
            raise ValueError("distill_logits: this model has no auxiliary head (built with aux_head=False)")
        t, shared = self._trunk(b)
        out = self.aux(t, b.domain, shared)
        return out[:, 0], out[:, 1]

    def both_logits(self, b: TorchBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(serving (B, 2), auxiliary (B, 2) or None) from one pass through the shared trunk."""
        serving, aux, _ = self.all_logits(b)
        return serving, aux

    def all_logits(self, b: TorchBatch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(serving (B, 2), auxiliary (B, 2) or None, C2AL cohort heads (B, K) or None), one trunk pass."""
        t, shared, e = self._trunk_e(b)
        heads = None
        if self.c2al is not None:
            v = e[:, :, N_OBJ:]
            vu = v.index_select(1, self.user_side).sum(1)
            heads = self.c2al(t, vu, v.sum(1) - vu)
        return (self._serving(t, shared, b.domain), None if self.aux is None else self.aux(t, b.domain, shared),
                heads)

    def forward(self, b: TorchBatch) -> tuple[torch.Tensor, torch.Tensor]:
        l_ctr, l_cvr = self.logits(b)
        p_click = torch.sigmoid(l_ctr)
        return p_click, p_click * torch.sigmoid(l_cvr)


LOOPFM_MEAN_MOMENTUM = 0.01  # the running means' weight of a batch, once past the first 1 / 0.01 batches
# the starting weight of the FM's first-order terms in the LoopFM readout (the interaction's is 1). Measured on
# bench transfer --quick's stationary run (LoopFM ratio, pooled NE; VM alone NE 0.9651): first / interaction
# 1 / 1: 0.14, NE 0.977; 1 / 0: -0.05, NE 0.985; 0 / 1: 0.19, NE 0.958; 0 / 2: 0.22; 0.5 / 0.5: 0.17;
# 0.25 / 1: 0.25, NE 0.957. The FM's per-id weights are large (|x| ~1-2 against ~0.03 for its factors) and a
# VM trusting them fully is overconfident until its dense learning rate has scaled them down.
LOOPFM_FIRST_INIT = 0.25


def _shortcuts(e: torch.Tensor, user_side: torch.Tensor) -> torch.Tensor:
    """Wide and FM terms read straight off the embeddings (B, T, D) -> (B, 2), no parameters of their own.

    First order: coordinate k of every row is that id's weight for objective k (a logistic regression on the
    ids, learned at the embeddings' Adagrad rate). Second order: an FM over the other coordinates, restricted
    to pairs across the two sides, ``<sum_{user side} e_i, sum_{ad and context side} e_j>`` (tables in
    :data:`USER_SIDE` against all others), added to both objectives. The deep part learns such effects slowly
    through the cross layers and experts; as shortcuts they lift small-data and post-drift AUC (quality study:
    +0.8 points click AUC stationary, +1.7 after a sudden drift, where the plain model trailed an online LR).
    Pairs within one side (campaign x advertiser, user x country: near-constant per ad or per user) carried
    only noise: dropping them cut study 1's gap to the oracle by 0.1-0.15 points at 300k impressions.

    >>> e = torch.zeros(1, 3, 4); e[0, :, 2] = torch.tensor([1.0, 2.0, 3.0]); e[0, 0, 0] = 0.5
    >>> _shortcuts(e, torch.tensor([0])).tolist()   # wide: 0.5 / 0; FM: 1 * (2 + 3)
    [[5.5, 5.0]]
    """
    v = e[:, :, N_OBJ:]
    vu = v.index_select(1, user_side).sum(1)
    fm = (vu * (v.sum(1) - vu)).sum(-1, keepdim=True)  # (B, 1)
    return e[:, :, :N_OBJ].sum(1) + fm


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``{"sparse": embedding rows x dims, "dense": everything else the serving model holds}``."""
    sparse = model.emb.num_tables * model.emb.rows * model.emb.dim
    dense = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("emb.", TRAINING_ONLY_PREFIX, C2AL_PREFIX)))
    return {"sparse": sparse, "dense": dense}


def esmm_loss(l_ctr: torch.Tensor, l_cvr: torch.Tensor, click: torch.Tensor, conversion: torch.Tensor,
              weight: torch.Tensor, weight_conv: torch.Tensor | None = None) -> torch.Tensor:
    """``mean(weight * BCE(pCTR, click) + weight_conv * BCE(pCTR*pCVR, conversion))`` (scalar; inputs (B,));
    ``weight_conv`` defaults to ``weight``."""
    l_click = F.binary_cross_entropy_with_logits(l_ctr, click, reduction="none")
    # log(p_ctr * p_cvr) = logsigmoid(l_ctr) + logsigmoid(l_cvr): stable where the product underflows
    log_p = F.logsigmoid(l_ctr) + F.logsigmoid(l_cvr)
    log_1mp = torch.log1p(-torch.exp(log_p).clamp(max=1 - PROB_EPS))
    l_conv = -(conversion * log_p + (1 - conversion) * log_1mp)
    if weight_conv is None:
        return ((l_click + l_conv) * weight).mean()
    return (l_click * weight + l_conv * weight_conv).mean()


@dataclass(frozen=True)
class StepResult:
    """Scores of a batch computed before the update (progressive validation) and the batch loss."""

    p_click: np.ndarray
    p_conversion: np.ndarray
    loss: float  # the whole loss: labels + teacher_weight * distillation (+ the adapter's)
    distill_loss: float = 0.0  # the distillation term (before teacher_weight); 0 without a teacher
    teacher_rows: int = 0  # rows of the batch that had a teacher
    c2al_loss: float = 0.0  # the C2AL term (before c2al_weight); 0 without C2AL


class Learner:
    """The model with its optimizers; one :meth:`train_step` per micro-batch.

    ``elapsed_s``: the labels dataflow's elapsed time (``elapsed`` policy); ``delay_weighting``: apply the
    ES-DFM weights to ``elapsed``/``late_positive`` examples (False: train on the observed labels as they are,
    the naive baseline).

    With ``tcfg.teacher_weight > 0`` the model has the auxiliary head (``tcfg.aux_head``) and the learner a
    :class:`StudentAdapter` (``tcfg.student_adapter``, with the auxiliary head only); see the module docstring.
    ``distill_stats``: rows seen, rows with a teacher, summed distillation and adapter losses.
    """

    def __init__(self, tcfg: TrainerConfig, *, elapsed_s: float = delay.ELAPSED_S, delay_weighting: bool = True):
        self.tcfg = tcfg
        self.device = resolve_device(tcfg.device)
        self.backend = resolve_backend(tcfg.backend, self.device)
        torch.manual_seed(tcfg.seed)
        self.distill = tcfg.teacher_weight > 0
        aux = self.distill and tcfg.aux_head
        # C2AL (trainer/cohorts.py): every learner names its examples' cohorts (per-cohort metrics); with
        # tcfg.c2al the model has one training-only head per targeted cohort
        from trainer.cohorts import CohortAssigner, CohortTargets

        self.cohorts = CohortAssigner()
        self.c2al_targets = CohortTargets(tcfg.c2al_cohorts) if tcfg.c2al else None
        self.model = MDMOModel(tcfg, self.backend, self.device, aux_head=aux,
                               c2al_heads=len(self.c2al_targets) if self.c2al_targets is not None else 0)
        # LoKA (trainer/precision.py): trainer.precision other than fp32 dispatches the dense layers' kernels
        from trainer.precision import for_learner

        self.precision = for_learner(tcfg, self.model, self.device)
        self.dense_params = [p for n, p in self.model.named_parameters() if not n.startswith("emb.")]
        wide = self.model.solaris_wide  # SOLARIS's linear term: its own learning rate (a param group)
        self.opt = _adam(self.dense_params if wide is None else [
            {"params": [p for p in self.dense_params if all(p is not q for q in wide.parameters())]},
            {"params": list(wide.parameters()), "lr": SOLARIS_LR}], tcfg.lr_dense)
        # the student adapter (training only; its own optimizer): with the auxiliary head only
        self.adapter = StudentAdapter(self.model.n_dom, self.device) if aux and tcfg.student_adapter else None
        self.adapter_opt = _adam(list(self.adapter.parameters()), ADAPTER_LR) if self.adapter is not None else None
        self.teacher_version_seen = -1  # the newest FM model_version seen (for the version gap)
        self._last_distill = 0.0
        self.distill_stats = {"rows": 0, "teacher_rows": 0, "distill_loss_sum": 0.0, "adapter_loss_sum": 0.0}
        self.steps = 0
        self.elapsed_ms = float(elapsed_s) * 1000.0
        self.delay_weighting = delay_weighting
        self.delays = {"click": delay.DelayHistogram(), "conversion": delay.DelayHistogram()}
        # the user model's vectors the ranker reads (trainer/users/features.UserVectors), when tcfg.user_model
        self.user_view = None
        # the FM's user/ad vectors a VM reads (trainer/loopfm.FMEmbeddingView), when tcfg.loopfm
        self.loopfm_view = None
        # the ads' semantic IDs (embedding_store/semantic_ids.py) the features read, when tcfg.ad_id_features
        # is not "hash": codes assigned at each ad's birth from its creative; checkpointed with the model
        self.semantic_ids = None
        if tcfg.ad_id_features != "hash" and not tcfg.sid_path:  # sid_path: codes read off the impressions
            from embedding_store.semantic_ids import SemanticIdConfig, SemanticIds

            self.semantic_ids = SemanticIds(SemanticIdConfig(levels=tcfg.sid_levels, codes=tcfg.sid_codes,
                                                             seed=tcfg.seed))
        # multi-rank training (trainer/distributed.py): called after backward, before the optimizers step
        self.grad_sync: Callable[[], None] | None = None
        # the FM's cached pair predictions a VM reads (trainer/solaris.SolarisView), when tcfg.solaris
        self.solaris_view = None

    def loss_weights(self, fb: FeatureBatch, p_click: np.ndarray, p_ctcvr: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray | None]:
        """Update the delay histograms with ``fb``'s positives; ``(w_click, w_conversion)`` (B,) float32
        (``w_conversion`` None when both equal ``fb.weight``: every label in the batch is final)."""
        if fb.decided is None:
            return fb.weight, None
        late = fb.late
        self.delays["click"].update(fb.click_delay_ms[(fb.click > 0) & (late != 2)])
        self.delays["conversion"].update(fb.conversion_delay_ms[(fb.conversion > 0) & (late != 1)])
        if not self.delay_weighting or not (fb.decided >= delay.ELAPSED).any():
            return fb.weight, None
        s_click = self.delays["click"].survival(self.elapsed_ms)
        s_conv = self.delays["conversion"].survival(self.elapsed_ms)
        wc, wv = delay.objective_weights(fb.decided, late, fb.click, fb.conversion, p_click.astype(np.float64),
                                         p_ctcvr.astype(np.float64), s_click, s_conv)
        return (fb.weight * wc).astype(np.float32), (fb.weight * wv).astype(np.float32)

    @torch.no_grad()
    def score(self, fb: FeatureBatch) -> tuple[np.ndarray, np.ndarray]:
        """(p_click (B,), p_conversion (B,)) without changing anything."""
        p_click, p_conv = self.model(fb.to_torch(self.device))
        return p_click.cpu().numpy(), p_conv.cpu().numpy()

    def train_step(self, fb: FeatureBatch,
                   before_update: Callable[[np.ndarray, np.ndarray], None] | None = None) -> StepResult:
        """Score ``fb`` (pre-update), call ``before_update(p_click, p_conversion)``, then learn from it.

        One forward serves both: its outputs are computed before any weight changes (fbgemm updates
        the embeddings inside ``backward()``), so they are exactly the no-grad progressive-validation scores.
        """
        b = fb.to_torch(self.device)
        if self.precision is not None:  # a sampled step: the probe's hooks capture this forward and backward
            self.precision.before_step()
        serving, aux, heads = self.model.all_logits(b)
        l_ctr, l_cvr = serving[:, 0], serving[:, 1]
        with torch.no_grad():
            p_click = torch.sigmoid(l_ctr)
            p_click_np = p_click.cpu().numpy()
            p_conv_np = (p_click * torch.sigmoid(l_cvr)).cpu().numpy()
        if before_update is not None:
            before_update(p_click_np, p_conv_np)
        w_click, w_conv = self.loss_weights(fb, p_click_np, p_conv_np)
        if w_conv is None:
            loss = esmm_loss(l_ctr, l_cvr, b.click, b.conversion, b.weight)
        else:
            loss = esmm_loss(l_ctr, l_cvr, b.click, b.conversion, torch.from_numpy(w_click).to(self.device),
                             torch.from_numpy(w_conv).to(self.device))
        distill, rows = self._distill_loss(fb, b, serving, aux)
        if distill is not None:
            loss = loss + distill
        c2al = self._c2al_loss(fb, heads)
        if c2al is not None:
            loss = loss + self.tcfg.c2al_weight * c2al
        self.opt.zero_grad(set_to_none=True)
        if self.adapter_opt is not None:
            self.adapter_opt.zero_grad(set_to_none=True)
        loss.backward()  # fbgemm: the sparse row-wise Adagrad update happens here
        if self.precision is not None:
            self.precision.after_backward()
        if self.grad_sync is not None:  # several ranks: dense gradients averaged (trainer/sharded.py)
            self.grad_sync()
        self.opt.step()
        if self.adapter_opt is not None and distill is not None:
            self.adapter_opt.step()
        self.model.emb.step()  # torch backend: the sparse update; fbgemm: no-op
        self.steps += 1
        self.distill_stats["rows"] += fb.batch_size
        d = self._last_distill
        return StepResult(p_click_np, p_conv_np, float(loss.detach()), d, rows,
                          0.0 if c2al is None else float(c2al.detach()))

    def _c2al_loss(self, fb: FeatureBatch, heads: torch.Tensor | None) -> torch.Tensor | None:
        """Mean over the cohort heads of the example-weighted BCE against ``click * [in cohort]``
        (trainer/cohorts.c2al_labels); None without C2AL."""
        if heads is None:
            return None
        if fb.cohort is None:
            raise ValueError("trainer.c2al: the batch has no cohorts; featurize it with cohorts=learner.cohorts")
        from trainer.cohorts import c2al_labels

        y = torch.from_numpy(c2al_labels(fb.click, self.c2al_targets.masks(fb.cohort))).to(self.device)
        w = torch.from_numpy(fb.weight).to(self.device)[:, None]
        return (F.binary_cross_entropy_with_logits(heads, y, reduction="none") * w).mean()

    def _staleness(self, fb: FeatureBatch) -> torch.Tensor:
        """(B, 2) adapter staleness features: log1p(age s), log1p(FM version gap), over :data:`STALE_SCALE`.
        The gap is to the newest FM version this learner has seen (0 for the newest, and where absent)."""
        ver = fb.teacher_version
        if ver is not None and len(ver):
            self.teacher_version_seen = max(self.teacher_version_seen, int(ver.max()))
            gap = np.where(ver >= 0, self.teacher_version_seen - ver, 0).astype(np.float32)
        else:
            gap = np.zeros(fb.batch_size, np.float32)
        age = np.maximum(fb.teacher_age_s, 0.0).astype(np.float32)
        st = np.stack([np.log1p(age), np.log1p(gap)], axis=1) / STALE_SCALE
        return torch.from_numpy(st.astype(np.float32)).to(self.device)

    def _distill_loss(self, fb: FeatureBatch, b: TorchBatch, serving: torch.Tensor, aux: torch.Tensor | None
                      ) -> tuple[torch.Tensor | None, int]:
        """``teacher_weight * distillation (+ the adapter's label loss)`` of the batch, None without a teacher
        (or without distillation); and the number of rows with a teacher. Rows without one weigh 0."""
        self._last_distill = 0.0
        if not self.distill or fb.has_teacher is None:
            return None, 0
        rows = int(fb.has_teacher.sum())
        if rows == 0:
            return None, 0
        w = b.has_teacher * b.weight
        l_t = teacher_logits(b.teacher_p_click, b.teacher_p_conversion)
        out = []
        if self.adapter is not None:
            a = self.adapter(l_t, self._staleness(fb), b.domain)
            adapter_loss = esmm_loss(a[:, 0], a[:, 1], b.click, b.conversion, w)
            out.append(adapter_loss)
            self.distill_stats["adapter_loss_sum"] += float(adapter_loss.detach()) * fb.batch_size
            target = a.detach()  # the adapter's corrected teacher is the auxiliary head's target
        else:
            target = l_t
        q_ctr = torch.sigmoid(target[:, 0])
        q_ctcvr = q_ctr * torch.sigmoid(target[:, 1])
        head = aux if aux is not None else serving  # aux_head=False: plain distillation on the serving head
        distill = esmm_loss(head[:, 0], head[:, 1], q_ctr, q_ctcvr, w)
        self._last_distill = float(distill.detach())
        self.distill_stats["teacher_rows"] += rows
        self.distill_stats["distill_loss_sum"] += self._last_distill * fb.batch_size
        out.append(self.tcfg.teacher_weight * distill)
        return sum(out[1:], out[0]), rows

    @torch.no_grad()
    def adapted_teacher(self, fb: FeatureBatch) -> tuple[np.ndarray, np.ndarray] | None:
        """The adapter's corrected teacher (p_click (B,), p_conversion (B,)) for ``fb`` (meaningful where
        ``fb.has_teacher``), without changing anything; None without an adapter or teacher columns."""
        if self.adapter is None or fb.has_teacher is None:
            return None
        b = fb.to_torch(self.device)
        a = self.adapter(teacher_logits(b.teacher_p_click, b.teacher_p_conversion), self._peek_staleness(fb),
                         b.domain)
        pc = torch.sigmoid(a[:, 0])
        return pc.cpu().numpy(), (pc * torch.sigmoid(a[:, 1])).cpu().numpy()

    def _peek_staleness(self, fb: FeatureBatch) -> torch.Tensor:
        seen = self.teacher_version_seen
        try:
            return self._staleness(fb)
        finally:
            self.teacher_version_seen = seen

    def state(self) -> dict:
        """Everything needed to continue bit-exactly: weights, optimizer states, step count, RNG."""
        dense = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items() if not k.startswith("emb.")}
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"dense": dense, "sparse": self.model.emb.export_state(), "dense_opt": _to_cpu(self.opt.state_dict()),
                "steps": self.steps, "rng": rng, "backend": self.backend, "model_version": MODEL_VERSION,
                "delays": {k: h.state() for k, h in self.delays.items()},
                **({"user_view": self.user_view.state()} if self.user_view is not None else {}),
                **({"semantic_ids": self.semantic_ids.state()} if self.semantic_ids is not None else {}),
                "cohorts": self.cohorts.state(),
                **({"precision": self.precision.state()} if self.precision is not None else {}),
                **({"adapter": _to_cpu(self.adapter.state_dict()), "adapter_opt": _to_cpu(self.adapter_opt.state_dict()),
                    "teacher_version_seen": self.teacher_version_seen} if self.adapter is not None else {})}

    def load_state(self, st: dict) -> None:
        version = st.get("model_version", 1)
        if version != MODEL_VERSION:
            raise ValueError(f"checkpoint holds model version {version}, this streamrec trains version {MODEL_VERSION}: "
                             "start over (`streamrec train --fresh`), or continue with the streamrec that wrote it")
        try:
            missing, unexpected = self.model.load_state_dict(st["dense"], strict=False)
        except RuntimeError as e:  # shapes differ: the checkpoint comes from other trainer settings
            detail = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
            raise ValueError("checkpoint model state does not fit this model; was it trained with other trainer "
                             f"settings (user_model, user_dim, embedding_dim, cat_slots, dense_dim)? {detail}") from None
        missing = [k for k in missing if not k.startswith("emb.")]
        if missing or unexpected:
            raise ValueError(f"checkpoint model state: missing {missing}, unexpected {unexpected} (the auxiliary "
                             "head aux.* exists with teacher_weight > 0 and aux_head, the C2AL heads c2al.* with "
                             "trainer.c2al, one per c2al_cohorts pattern: were they changed?)")
        self.model.emb.import_state(st["sparse"])
        self.opt.load_state_dict(st["dense_opt"])  # moves state tensors to the params' device
        if self.adapter is not None and "adapter" in st:  # a checkpoint from before distillation: a fresh adapter
            self.adapter.load_state_dict(st["adapter"])
            self.adapter_opt.load_state_dict(st["adapter_opt"])
            self.teacher_version_seen = int(st.get("teacher_version_seen", -1))
        self.steps = int(st["steps"])
        for k, h in st.get("delays", {}).items():
            self.delays[k] = delay.DelayHistogram.from_state(h)
        if "cohorts" in st:  # a checkpoint from before cohorts: activity counts start over
            from trainer.cohorts import CohortAssigner

            self.cohorts = CohortAssigner.from_state(st["cohorts"])
        if self.precision is not None and "precision" in st:
            self.precision.load_state(st["precision"])
        if "user_view" in st:
            from trainer.users.features import UserVectors

            self.user_view = UserVectors.from_state(st["user_view"])
        if self.semantic_ids is not None and "semantic_ids" in st:
            from embedding_store.semantic_ids import SemanticIds

            self.semantic_ids = SemanticIds.from_state(st["semantic_ids"])
        torch.set_rng_state(st["rng"]["cpu"])
        if self.device.type == "cuda" and "cuda" in st["rng"]:
            torch.cuda.set_rng_state(st["rng"]["cuda"], self.device)


def _adam(params, lr: float) -> torch.optim.Optimizer:
    """Adam with the fused kernel (one op per step instead of ~10 per parameter tensor) where torch has it."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # older torch, or a device without the fused kernel
        return torch.optim.Adam(params, lr=lr)


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj
