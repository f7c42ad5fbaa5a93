"""The unified multi-domain multi-objective (MDMO) ranking model and its training step.

Architecture (B examples, T tables of D dims, ``dense_dim`` dense values, ``N_DOM`` domains)::

    sparse ids --SparseEmbeddings--> (B, T*D) -+
    dense      --------------------> (B, dd)  -+-- concat x0 (B, F)
    domain     --nn.Embedding------> (B, 8)   -+
    x1 = x0 * (W x0 + b) + x0                      one DCNv2 cross layer (full rank)
    h  = MLP(x1) (B, 64) * 2*sigmoid(gate[domain])  shared interaction, per-domain gate (1.0 at init)
    [l_ctr, l_cvr] = head(h) + bias[domain]        objective heads with per-domain biases
    p_click = sigmoid(l_ctr);  p_conversion = p_click * sigmoid(l_cvr)        (ESMM)

Loss (example-weighted means): ``BCE(p_click, click) + BCE(p_click * p_cvr, conversion)``, so the conversion
head learns over the whole impression space (no sample-selection bias from training on clicks only).

:class:`Learner` owns the model and both optimizers (Adam for dense parameters; row-wise Adagrad for the
embeddings, fused into backward with fbgemm) and exports/imports its complete state for checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from streams import schema
from streams.config import TrainerConfig
from trainer.embeddings import make_embeddings, resolve_backend, resolve_device
from trainer.features import FeatureBatch, TorchBatch, table_names

DOMAIN_DIM = 8
HIDDEN = (128, 64)
PROB_EPS = 1e-7


class MDMOModel(nn.Module):
    """See the module docstring. ``forward(batch) -> (p_click (B,), p_conversion (B,))``."""

    def __init__(self, tcfg: TrainerConfig, backend: str, device: torch.device):
        super().__init__()
        n_dom = len(schema.DOMAINS)
        self.num_tables = len(table_names(tcfg))
        self.emb = make_embeddings(backend, self.num_tables, tcfg.hash_buckets, tcfg.embedding_dim,
                                   tcfg.lr_sparse, device)
        self.domain_emb = nn.Embedding(n_dom, DOMAIN_DIM, device=device)
        f = self.num_tables * tcfg.embedding_dim + tcfg.dense_dim + DOMAIN_DIM
        self.cross = nn.Linear(f, f, device=device)
        self.mlp = nn.Sequential(nn.Linear(f, HIDDEN[0], device=device), nn.ReLU(),
                                 nn.Linear(HIDDEN[0], HIDDEN[1], device=device), nn.ReLU())
        self.domain_gate = nn.Embedding(n_dom, HIDDEN[1], device=device)
        self.head = nn.Linear(HIDDEN[1], 2, device=device)
        self.domain_bias = nn.Embedding(n_dom, 2, device=device)
        with torch.no_grad():  # domain-aware parts start neutral: gate 1.0, bias 0
            self.domain_gate.weight.zero_()
            self.domain_bias.weight.zero_()
            self.cross.weight.mul_(0.1)

    def logits(self, b: TorchBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(l_ctr (B,), l_cvr (B,))."""
        x0 = torch.cat([self.emb(b.indices, b.offsets), b.dense, self.domain_emb(b.domain)], dim=1)
        x1 = x0 * self.cross(x0) + x0
        h = self.mlp(x1) * (2.0 * torch.sigmoid(self.domain_gate(b.domain)))
        out = self.head(h) + self.domain_bias(b.domain)
        return out[:, 0], out[:, 1]

    def forward(self, b: TorchBatch) -> tuple[torch.Tensor, torch.Tensor]:
        l_ctr, l_cvr = self.logits(b)
        p_click = torch.sigmoid(l_ctr)
        return p_click, p_click * torch.sigmoid(l_cvr)


def esmm_loss(l_ctr: torch.Tensor, l_cvr: torch.Tensor, click: torch.Tensor, conversion: torch.Tensor,
              weight: torch.Tensor) -> torch.Tensor:
    """Weighted ``BCE(pCTR, click) + BCE(pCTR*pCVR, conversion)`` (scalar; all inputs (B,))."""
    l_click = F.binary_cross_entropy_with_logits(l_ctr, click, reduction="none")
    # log(p_ctr * p_cvr) = logsigmoid(l_ctr) + logsigmoid(l_cvr): stable where the product underflows
    log_p = F.logsigmoid(l_ctr) + F.logsigmoid(l_cvr)
    log_1mp = torch.log1p(-torch.exp(log_p).clamp(max=1 - PROB_EPS))
    l_conv = -(conversion * log_p + (1 - conversion) * log_1mp)
    return ((l_click + l_conv) * weight).mean()


@dataclass(frozen=True)
class StepResult:
    """Scores of a batch computed before the update (progressive validation) and the batch loss."""

    p_click: np.ndarray
    p_conversion: np.ndarray
    loss: float


class Learner:
    """The model with its optimizers; one :meth:`train_step` per micro-batch."""

    def __init__(self, tcfg: TrainerConfig):
        self.tcfg = tcfg
        self.device = resolve_device(tcfg.device)
        self.backend = resolve_backend(tcfg.backend, self.device)
        torch.manual_seed(tcfg.seed)
        self.model = MDMOModel(tcfg, self.backend, self.device)
        self.dense_params = [p for n, p in self.model.named_parameters() if not n.startswith("emb.")]
        self.opt = torch.optim.Adam(self.dense_params, lr=tcfg.lr_dense)
        self.steps = 0

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
        loss = esmm_loss(l_ctr, l_cvr, b.click, b.conversion, b.weight)
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
                "steps": self.steps, "rng": rng, "backend": self.backend}

    def load_state(self, st: dict) -> None:
        missing, unexpected = self.model.load_state_dict(st["dense"], strict=False)
        missing = [k for k in missing if not k.startswith("emb.")]
        if missing or unexpected:
            raise ValueError(f"checkpoint model state: missing {missing}, unexpected {unexpected}")
        self.model.emb.import_state(st["sparse"])
        self.opt.load_state_dict(st["dense_opt"])  # moves state tensors to the params' device
        self.steps = int(st["steps"])
        torch.set_rng_state(st["rng"]["cpu"])
        if self.device.type == "cuda" and "cuda" in st["rng"]:
            torch.cuda.set_rng_state(st["rng"]["cuda"], self.device)


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj
