"""The unified multi-domain multi-objective (MDMO) ranking model and its training step.

Architecture (B examples, T tables of D dims, ``dense_dim`` dense values, ``N_DOM`` domains, ``E`` experts,
2 objectives)::

    sparse ids --SparseEmbeddings--> (B, T*D) -+
    dense      --------------------> (B, dd)  -+-- concat x0 (B, F)
    domain     --nn.Embedding------> (B, 8)   -+
    user model --[u, u * v_ad]-----> (B, 2du) -+   (when trainer.users.model; trainer/users/features.py)
    LoopFM --[u, a, u * a, present]> (B, 3d+1) -+  (when trainer.loopfm: the FM's vectors; trainer/loopfm.py)
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


class MDMOModel(nn.Module):
    """See the module docstring. ``forward(batch) -> (p_click (B,), p_conversion (B,))``."""

    def __init__(self, tcfg: TrainerConfig, backend: str, device: torch.device):
        super().__init__()
        self.n_dom = len(schema.DOMAINS)
        self.num_tables = len(table_names(tcfg))
        self.emb = make_embeddings(backend, self.num_tables, tcfg.hash_buckets, tcfg.embedding_dim,
                                   tcfg.lr_sparse, device, fiited=tcfg.fiited)
        self.domain_emb = nn.Embedding(self.n_dom, DOMAIN_DIM, device=device)
        self.user_in = 2 * tcfg.user_dim if tcfg.user_model else 0  # [u, u * v_ad] (trainer/users/features.py)
        self.loopfm_in = 3 * tcfg.loopfm_dim + 1 if tcfg.loopfm else 0  # [u_fm, a_fm, u_fm * a_fm, present]
        f = self.num_tables * tcfg.embedding_dim + tcfg.dense_dim + DOMAIN_DIM + self.user_in + self.loopfm_in
        self.cross = nn.ModuleList(nn.Linear(f, f, device=device) for _ in range(N_CROSS))
        self.bottom = nn.Linear(f, BOTTOM, device=device)
        self.experts = nn.Linear(BOTTOM, N_EXPERTS * EXPERT_DIM, device=device)
        self.gates = nn.Linear(BOTTOM, self.n_dom * N_OBJ * N_EXPERTS, device=device)
        self.head_w = nn.Parameter(torch.empty(N_OBJ, EXPERT_DIM, device=device))
        self.head_b = nn.Parameter(torch.zeros(N_OBJ, device=device))
        self.domain_bias = nn.Embedding(self.n_dom, N_OBJ, device=device)
        self.dense_wide = nn.Linear(tcfg.dense_dim, N_OBJ, bias=False, device=device)
        self.register_buffer("user_side", torch.tensor(
            [i for i, name in enumerate(table_names(tcfg)) if name in USER_SIDE], device=device), persistent=False)
        with torch.no_grad():  # domain-aware parts start neutral: uniform gates, bias 0
            nn.init.uniform_(self.head_w, -EXPERT_DIM ** -0.5, EXPERT_DIM ** -0.5)
            self.gates.weight.zero_()
            self.gates.bias.zero_()
            self.domain_bias.weight.zero_()
            self.dense_wide.weight.zero_()
            for c in self.cross:
                c.weight.mul_(0.1)

    def logits(self, b: TorchBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(l_ctr (B,), l_cvr (B,))."""
        parts = [self.emb(b.indices, b.offsets), b.dense, self.domain_emb(b.domain)]
        if self.user_in:
            parts.append(b.user if b.user is not None else b.dense.new_zeros(b.dense.shape[0], self.user_in))
        if self.loopfm_in:
            parts.append(b.loopfm if b.loopfm is not None else b.dense.new_zeros(b.dense.shape[0], self.loopfm_in))
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
        out = (t * self.head_w).sum(-1) + self.head_b + self.domain_bias(b.domain)
        out = out + _shortcuts(parts[0].view(n, self.num_tables, -1), self.user_side) + self.dense_wide(b.dense)
        return out[:, 0], out[:, 1]

    def forward(self, b: TorchBatch) -> tuple[torch.Tensor, torch.Tensor]:
        l_ctr, l_cvr = self.logits(b)
        p_click = torch.sigmoid(l_ctr)
        return p_click, p_click * torch.sigmoid(l_cvr)


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
    """``{"sparse": embedding rows x dims, "dense": everything else}``."""
    sparse = model.emb.num_tables * model.emb.rows * model.emb.dim
    dense = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("emb."))
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
    loss: float


class Learner:
    """The model with its optimizers; one :meth:`train_step` per micro-batch.

    ``elapsed_s``: the labels dataflow's elapsed time (``elapsed`` policy); ``delay_weighting``: apply the
    ES-DFM weights to ``elapsed``/``late_positive`` examples (False: train on the observed labels as they are,
    the naive baseline).
    """

    def __init__(self, tcfg: TrainerConfig, *, elapsed_s: float = delay.ELAPSED_S, delay_weighting: bool = True):
        self.tcfg = tcfg
        self.device = resolve_device(tcfg.device)
        self.backend = resolve_backend(tcfg.backend, self.device)
        torch.manual_seed(tcfg.seed)
        self.model = MDMOModel(tcfg, self.backend, self.device)
        self.dense_params = [p for n, p in self.model.named_parameters() if not n.startswith("emb.")]
        self.opt = _adam(self.dense_params, tcfg.lr_dense)
        self.steps = 0
        self.elapsed_ms = float(elapsed_s) * 1000.0
        self.delay_weighting = delay_weighting
        self.delays = {"click": delay.DelayHistogram(), "conversion": delay.DelayHistogram()}
        # the user model's vectors the ranker reads (trainer/users/features.UserVectors), when tcfg.user_model
        self.user_view = None
        # the FM's user/ad vectors a VM reads (trainer/loopfm.FMEmbeddingView), when tcfg.loopfm
        self.loopfm_view = None

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
        l_ctr, l_cvr = self.model.logits(b)
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
        self.opt.zero_grad(set_to_none=True)
        loss.backward()  # fbgemm: the sparse row-wise Adagrad update happens here
        self.opt.step()
        self.model.emb.step()  # torch backend: the sparse update; fbgemm: no-op
        self.steps += 1
        return StepResult(p_click_np, p_conv_np, float(loss.detach()))

    def state(self) -> dict:
        """Everything needed to continue bit-exactly: weights, optimizer states, step count, RNG."""
        dense = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items() if not k.startswith("emb.")}
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"dense": dense, "sparse": self.model.emb.export_state(), "dense_opt": _to_cpu(self.opt.state_dict()),
                "steps": self.steps, "rng": rng, "backend": self.backend, "model_version": MODEL_VERSION,
                "delays": {k: h.state() for k, h in self.delays.items()},
                **({"user_view": self.user_view.state()} if self.user_view is not None else {})}

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
            raise ValueError(f"checkpoint model state: missing {missing}, unexpected {unexpected}")
        self.model.emb.import_state(st["sparse"])
        self.opt.load_state_dict(st["dense_opt"])  # moves state tensors to the params' device
        self.steps = int(st["steps"])
        for k, h in st.get("delays", {}).items():
            self.delays[k] = delay.DelayHistogram.from_state(h)
        if "user_view" in st:
            from trainer.users.features import UserVectors

            self.user_view = UserVectors.from_state(st["user_view"])
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
