"""LoKA: FP8 for the MDMO ranker's dense layers (``trainer.precision``): Probe, Mods, Dispatch.

LRMs are numerically sensitive (small GEMMs followed by normalisation), so FP8 is applied per layer, where it is
measured to be safe, not everywhere (the LoKA paper; digest in the shared papers). Three parts:

**Probe** (:class:`Probe`). Every ``precision_probe_every`` training steps (a sampled batch) forward hooks on the
model's ``nn.Linear`` layers (and a gradient hook each sets on its output) capture each layer's input ``x`` (B, K), weight ``W`` (N, K) and output
gradient ``dY`` (B, N). For every candidate kernel the probe then emulates the layer's three GEMMs (forward
``Y = x W^T``, data gradient ``dX = dY W``, weight gradient ``dW = dY^T x``) with that kernel's operand formats,
using torch's float8 dtypes (scale, cast to ``float8_e4m3fn`` / ``float8_e5m2``, cast back, unscale) and bf16 the
same way, accumulating in fp32 as tensor cores do; the layer's error for the kernel is the largest of the three GEMMs' mean
relative row error ``||g_q - g|| / ||g||`` against fp32 (:func:`gemm_error`). Per (layer, kernel) the error's running mean
and variance (exponential, :data:`EMA`) give an upper bound ``mean + 2 std`` (:meth:`Probe.upper`); the tensors'
absmax, RMS and crest factor (absmax / RMS: outliers, what per-tensor scaling suffers from) and the share of
gradient entries an e4m3 cast flushes to zero are kept beside them (the dashboard's table).

Kernels (:data:`KERNELS`, fastest first on an H100-class card): ``fp8_tensor`` (e4m3 inputs and weights, e5m2
gradients, one scale per tensor), ``fp8_row`` (the same formats, one scale per row of each operand along the
contraction: ``torch._scaled_mm``'s row-wise scaling; it costs an amax per row but survives outlier rows), ``bf16``,
``fp32``. Forward operands are e4m3 (precision), gradients e5m2 (range), as the FP8 training recipes do.

**Mods** (:class:`Mods`): the model changes that keep FP8 safe. The first layer (it reads raw, unnormalised
features: dense values, embeddings, the user model's vectors) and the last layer (it writes the logits' terms) are
never run in FP8 (bf16 at most); the DCNv2 cross layers' outputs are accumulated and kept in fp32 (their residual
sum ``x_{l+1} = x0 * (W x_l + b) + x_l`` compounds rounding over the layers), every other layer's output is rounded
to bf16 under a bf16 or fp8 kernel (what the kernels write); and operands are rescaled (per tensor or per row,
whichever the dispatch picks) to the format's range before every cast. On the real kernel
(:func:`scaled_linear`), dimensions are zero-padded to multiples of 16 (``_scaled_mm``'s constraint).

**Dispatch** (:class:`Dispatch`): per layer, the fastest kernel (by a :class:`CostTable`: measured on the device
with :func:`measure_costs`, or the :data:`H100_COSTS` model) whose probed error bound stays within
``precision_bound``; fp32 is always allowed. Revisited at every probe, so the choice follows the stream: a kernel
whose latest probed error exceeds the bound is left at once (demotion), a faster one is taken only when its upper
bound is below ``PROMOTE_MARGIN * bound`` after at least :data:`MIN_PROBES` probes (no flapping).

``trainer.precision``: ``fp32`` (default: nothing attached, no overhead), ``bf16`` (every layer bf16), ``fp8``
(every layer Mods allow in ``fp8_row``, the others bf16), ``auto`` (the dispatch). The probe runs in every mode
but fp32, so the dashboard shows the errors whatever runs. Execution on CPU is emulated (the cast-and-back above,
fp32 matmuls): it reproduces FP8's numbers, not its speed. On a CUDA card with fp8 tensor cores the layers run
``torch._scaled_mm`` and bf16 matmuls instead (:func:`scaled_linear`, :func:`real_kernels`), forward and backward.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

KERNELS = ("fp8_tensor", "fp8_row", "bf16", "fp32")
FP8 = ("fp8_tensor", "fp8_row")
KERNEL_CODE = {k: i for i, k in enumerate(KERNELS)}  # the number a ServiceStats value carries
MODES = ("fp32", "auto", "bf16", "fp8")
E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
EMA = 0.2  # weight of the newest probe in the running mean / variance of an error
MIN_PROBES = 3  # probes of a layer before the dispatch trusts its statistics
PROMOTE_MARGIN = 0.8  # a faster kernel is taken when its upper bound is below this share of the bound
Z = 2.0  # upper bound = mean + Z * std
_TINY = 1e-12


# ---- emulated formats ----------------------------------------------------------------------------------------
def qdq(x: torch.Tensor, fmt: str, scaling: str = "tensor", dim: int = -1) -> torch.Tensor:
    """``x`` as the kernel sees it after the cast: fp8 (``"e4m3"`` / ``"e5m2"``) scaled so that its absmax (of the
    whole tensor, or of each slice along ``dim`` with ``scaling="row"``: one scale per index of the other
    dimension) maps to the format's largest value, cast and cast back; ``"bf16"`` rounded; ``"fp32"`` as is.

    >>> x = torch.tensor([[1.0, 1000.0], [0.001, 0.002]])
    >>> float((qdq(x, "e4m3", "tensor") - x).abs()[1].max()) > 1e-4   # the small row drowns in one scale
    True
    >>> float((qdq(x, "e4m3", "row", dim=1) - x).abs()[1].max()) < 1e-4  # its own scale keeps it
    True
    """
    if fmt == "fp32":
        return x
    if fmt == "bf16":
        return x.to(torch.bfloat16).to(x.dtype)
    dt = E4M3 if fmt == "e4m3" else E5M2
    fmax = torch.finfo(dt).max
    amax = x.abs().amax() if scaling == "tensor" else x.abs().amax(dim=dim, keepdim=True)
    scale = fmax / amax.float().clamp(min=_TINY)
    return ((x.float() * scale).to(dt).float() / scale).to(x.dtype)


def operand_formats(kernel: str) -> tuple[str, str, str]:
    """(forward operands, gradient, scaling) of a kernel: fp8 = e4m3 / e5m2; bf16 / fp32 alike for both."""
    if kernel in FP8:
        return "e4m3", "e5m2", "tensor" if kernel == "fp8_tensor" else "row"
    return kernel, kernel, "tensor"


def emulated_gemms(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor | None, kernel: str
                   ) -> dict[str, torch.Tensor]:
    """The layer's GEMMs with ``kernel``'s operands (fp32 accumulation): ``y`` = x W^T, and with ``dy`` also
    ``dx`` = dY W and ``dw`` = dY^T x. Row-wise scales run along each GEMM's contraction dimension."""
    a, g, s = operand_formats(kernel)
    out = {"y": qdq(x, a, s, 1) @ qdq(w, a, s, 1).T}
    if dy is not None:
        out["dx"] = qdq(dy, g, s, 1) @ qdq(w, a, s, 0)
        out["dw"] = qdq(dy, g, s, 0).T @ qdq(x, a, s, 0)
    return out


def gemm_error(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor | None, kernel: str) -> float:
    """Largest relative error of the layer's GEMMs under ``kernel`` against fp32 (0 for fp32): per GEMM the mean
    over its output rows (examples; for ``dw`` output features) of ``||row_q - row|| / ||row||``. Per row, not of
    the whole matrix: a few outlier examples would otherwise hide every other example's rows being flushed."""
    if kernel == "fp32":
        return 0.0
    x, w = x.detach().float(), w.detach().float()
    dy = None if dy is None else dy.detach().float()
    ref = emulated_gemms(x, w, dy, "fp32")
    got = emulated_gemms(x, w, dy, kernel)
    return max(float((torch.linalg.vector_norm(got[k] - ref[k], dim=1)
                      / torch.linalg.vector_norm(ref[k], dim=1).clamp(min=_TINY)).mean()) for k in ref)


def tensor_stats(t: torch.Tensor) -> tuple[float, float]:
    """(absmax, RMS) of a tensor."""
    t = t.detach().float()
    return float(t.abs().max()), float(t.pow(2).mean().sqrt())


# ---- Mods ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mods:
    """Which layers may run FP8 and how their outputs are kept (module docstring). ``order``: the layers in the
    order the forward runs them (the probe learns it from its hooks)."""

    pin_first: bool = True
    pin_last: bool = True
    fp32_accum: tuple[str, ...] = ("cross.",)  # name prefixes whose GEMM output stays fp32

    def pinned(self, order: list[str]) -> set[str]:
        """Layers limited to bf16 or fp32."""
        out = set()
        if order and self.pin_first:
            out.add(order[0])
        if order and self.pin_last:
            out.add(order[-1])
        return out

    def out_fp32(self, name: str) -> bool:
        return name.startswith(self.fp32_accum)

    def allowed(self, name: str, order: list[str]) -> tuple[str, ...]:
        return ("bf16", "fp32") if name in self.pinned(order) else KERNELS


# ---- cost tables ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CostModel:
    """Seconds of one training step's three GEMMs of an (M, K) x (K, N) layer: per kernel a fixed launch cost
    per GEMM, a throughput, and for fp8 the quantisation passes (amax + cast of every operand: bytes at the
    memory bandwidth, plus their launches)."""

    launch_s: float
    flops: dict[str, float]
    bandwidth: float  # bytes/s for the quantisation passes
    quant_launches: int = 2  # per operand: amax, cast

    def seconds(self, kernel: str, m: int, k: int, n: int) -> float:
        t = 3 * (self.launch_s + 2.0 * m * k * n / self.flops[kernel])
        if kernel in FP8:
            elems = 2 * (m * k + k * n + m * n)  # x, W, dY, each cast twice (two GEMM layouts)
            per_row = 2 if kernel == "fp8_row" else 1
            t += 6 * self.quant_launches * self.launch_s + per_row * elems * 5 / self.bandwidth
        return t


# dense-throughput figures of an H100 SXM (fp32 without TF32, bf16, fp8 tensor cores at ~60% of peak), 4 us per
# kernel launch, 3 TB/s: small GEMMs pay launches and casts, large ones gain the fp8 throughput
H100_COSTS = CostModel(launch_s=4e-6, flops={"fp32": 40e12, "bf16": 600e12, "fp8_row": 1100e12,
                                             "fp8_tensor": 1200e12}, bandwidth=3e12)


@dataclass
class CostTable:
    """Seconds per layer and kernel: measured ones (:func:`measure_costs`) where present, else the model's."""

    model: CostModel = H100_COSTS
    measured: dict[tuple[str, str], float] = field(default_factory=dict)  # (layer, kernel) -> s

    def seconds(self, layer: str, kernel: str, m: int, k: int, n: int) -> float:
        return self.measured.get((layer, kernel), self.model.seconds(kernel, m, k, n))


def _pad16(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    pad = []
    for d in range(t.dim() - 1, -1, -1):
        pad += [0, (-t.shape[d]) % 16 if d in dims else 0]
    return F.pad(t, pad) if any(pad) else t


def _fp8_cast(t: torch.Tensor, dt: torch.dtype, scaling: str, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    amax = t.abs().amax() if scaling == "tensor" else t.abs().amax(dim=dim, keepdim=True)
    scale = torch.finfo(dt).max / amax.float().clamp(min=_TINY)
    return (t.float() * scale).to(dt), (1.0 / scale).float()


def scaled_linear(x: torch.Tensor, w: torch.Tensor, kernel: str, out_dtype: torch.dtype = torch.float32,
                  x_fmt: str = "e4m3") -> torch.Tensor:
    """``x W^T`` (no bias) on the real kernels: ``torch._scaled_mm`` with e4m3 operands (``fp8_tensor``: one
    scale each; ``fp8_row``: a scale per row of x and per row of W, applied to the fp32 output), zero-padded to
    multiples of 16; ``bf16``:
    a bf16 matmul; ``fp32``: fp32. ``x_fmt="e5m2"``: x is a gradient (e5m2; W stays e4m3: the kernels take one
    e5m2 operand at most). Used by :func:`measure_costs` and (on CUDA) by the forward of a dispatched
    layer. Runs wherever ``_scaled_mm`` does (CUDA from sm_89; this torch's CPU build too)."""
    if kernel == "fp32":
        return (x @ w.T).to(out_dtype)
    if kernel == "bf16":
        return (x.to(torch.bfloat16) @ w.to(torch.bfloat16).T).to(out_dtype)
    m, n = x.shape[0], w.shape[0]
    xp, wp = _pad16(x, (0, 1)), _pad16(w, (0, 1))
    s = "tensor" if kernel == "fp8_tensor" else "row"
    xq, sx = _fp8_cast(xp, E5M2 if x_fmt == "e5m2" else E4M3, s, 1)
    wq, sw = _fp8_cast(wp, E4M3, s, 1)
    if s == "tensor":
        return torch._scaled_mm(xq, wq.T, scale_a=sx, scale_b=sw, out_dtype=out_dtype)[:m, :n]
    # row scales: a scale per row of x and per row of W factor out of the contraction, so the kernel runs with
    # unit scales into fp32 and the outer product of the scales is applied after (exact; CUDA's row-wise
    # _scaled_mm writes bf16 only, which would undo the fp32 accumulators the Mods keep)
    one = torch.ones((), device=x.device)
    y = torch._scaled_mm(xq, wq.T, scale_a=one, scale_b=one, out_dtype=torch.float32)
    return (y * sx.view(-1, 1) * sw.view(1, -1))[:m, :n].to(out_dtype)


def measure_costs(layers: dict[str, nn.Linear], batch: int, device: torch.device, reps: int = 20,
                  kernels: tuple[str, ...] = KERNELS) -> CostTable:
    """A :class:`CostTable` timed on ``device``: per layer and kernel, three :func:`scaled_linear` GEMMs of the
    layer's training step shapes (forward, data and weight gradient), best of ``reps``. A kernel that fails on
    the device (e.g. ``_scaled_mm`` before sm_89) is left out of the table, so the model's estimate stands."""
    table = CostTable()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for name, lin in layers.items():
        n, k = lin.weight.shape
        x = torch.randn(batch, k, device=device)
        w = torch.randn(n, k, device=device)
        dy = torch.randn(batch, n, device=device)
        shapes = ((x, w, "e4m3"), (dy, w.T.contiguous(), "e5m2"), (dy.T.contiguous(), x.T.contiguous(), "e5m2"))
        for kern in kernels:
            try:
                for a, b, f in shapes:
                    scaled_linear(a, b, kern, x_fmt=f)
            except (RuntimeError, NotImplementedError):
                continue
            best = math.inf
            for _ in range(reps):
                sync()
                t0 = time.perf_counter()
                for a, b, f in shapes:
                    scaled_linear(a, b, kern, x_fmt=f)
                sync()
                best = min(best, time.perf_counter() - t0)
            table.measured[(name, kern)] = best
    return table


# ---- the dispatched layer ------------------------------------------------------------------------------------
class _EmulatedLinear(torch.autograd.Function):
    """``x W^T + b`` with ``kernel``'s operand formats in forward and backward (fp32 accumulation), the output
    rounded to bf16 unless ``out_fp32``: FP8 / bf16 numerics on any device."""

    @staticmethod
    def forward(ctx, x, w, b, kernel: str, out_fp32: bool):
        ctx.save_for_backward(x, w)
        ctx.kernel, ctx.has_bias = kernel, b is not None
        a, _, s = operand_formats(kernel)
        y = qdq(x, a, s, 1) @ qdq(w, a, s, 1).T
        if b is not None:
            y = y + b
        return y if out_fp32 or kernel == "fp32" else qdq(y, "bf16")

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        a, g, s = operand_formats(ctx.kernel)
        dx = qdq(dy, g, s, 1) @ qdq(w, a, s, 0)
        dw = qdq(dy, g, s, 0).T @ qdq(x, a, s, 0)
        return dx, dw, dy.sum(0) if ctx.has_bias else None, None, None


def dispatched_forward(lin: nn.Linear, x: torch.Tensor, kernel: str, out_fp32: bool, real: bool) -> torch.Tensor:
    """The layer's output under ``kernel``: emulated (any device) or, with ``real``, the device's kernels
    (:func:`scaled_linear`, forward and backward: ``_scaled_mm`` has no autograd of its own)."""
    if kernel == "fp32":
        return F.linear(x, lin.weight, lin.bias)
    if real:
        return _RealLinear.apply(x, lin.weight, lin.bias, kernel, out_fp32)
    return _EmulatedLinear.apply(x, lin.weight, lin.bias, kernel, out_fp32)


class _RealLinear(torch.autograd.Function):
    """The real kernels (:func:`scaled_linear`) in forward (the bias added to the fp32 output, then the output
    rounded to bf16 unless ``out_fp32``, as the emulation does) and backward (the data and weight gradients with
    e5m2 gradients against e4m3 operands, fp32 out)."""

    @staticmethod
    def forward(ctx, x, w, b, kernel: str, out_fp32: bool):
        ctx.save_for_backward(x, w)
        ctx.kernel, ctx.has_bias = kernel, b is not None
        y = scaled_linear(x, w, kernel, torch.float32)
        if b is not None:
            y = y + b
        return y if out_fp32 else qdq(y, "bf16")

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        k = ctx.kernel
        dy = dy.contiguous()
        dx = scaled_linear(dy, w.T.contiguous(), k, x_fmt="e5m2")  # dY W: scales along N
        dw = scaled_linear(dy.T.contiguous(), x.T.contiguous(), k, x_fmt="e5m2")  # dY^T x: scales along B
        return dx, dw, dy.sum(0) if ctx.has_bias else None, None, None


class DispatchedLinear(nn.Linear):
    """An ``nn.Linear`` whose forward runs the kernel its :class:`Precision` (``loka``) picks for it
    (``loka_name``). :class:`Precision` turns the model's layers into these in place (their class, not copies):
    parameters and state dicts are unchanged, and a deep copy of the model carries a consistent copy of the
    dispatch (its layers are the copy's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, name = self.loka, self.loka_name
        return dispatched_forward(self, x, p.kernel(name), p.mods.out_fp32(name), p.real)


# ---- Probe ---------------------------------------------------------------------------------------------------
@dataclass
class _Running:
    mean: float = 0.0
    var: float = 0.0
    n: int = 0
    last: float = 0.0

    def add(self, v: float) -> None:
        self.last = v
        if self.n == 0:
            self.mean, self.var = v, 0.0
        else:
            d = v - self.mean
            self.mean += EMA * d
            self.var = (1 - EMA) * (self.var + EMA * d * d)
        self.n += 1

    def upper(self) -> float:
        return self.mean + Z * math.sqrt(max(self.var, 0.0))


class Probe:
    """Hooks on ``layers`` (name -> nn.Linear) for one sampled step: :meth:`arm` before the forward, :meth:`measure`
    after the backward (module docstring). ``errors[(layer, kernel)]``, ``stats[layer]`` hold the running figures."""

    def __init__(self, layers: dict[str, nn.Linear], kernels: tuple[str, ...] = KERNELS):
        self.layers, self.kernels = layers, kernels
        self.errors: dict[tuple[str, str], _Running] = {}
        self.stats: dict[str, dict[str, float]] = {}
        self.order: list[str] = []  # forward order of the layers, from the first probe
        self.shapes: dict[str, tuple[int, int, int]] = {}  # (M, K, N) of the last probe
        self.probes = 0
        self._handles: list = []
        self._x: dict[str, torch.Tensor] = {}
        self._dy: dict[str, torch.Tensor] = {}

    def arm(self) -> None:
        if self._handles:
            return
        self._x.clear()
        self._dy.clear()
        seen: list[str] = []
        for name, lin in self.layers.items():
            def fwd(mod, inp, out, name=name):  # the input now; the output's gradient when backward reaches it
                if name not in self._x:
                    seen.append(name)
                self._x[name] = inp[0].detach()
                if out.requires_grad:
                    out.register_hook(lambda g, name=name: self._dy.__setitem__(name, g.detach()))

            self._handles.append(lin.register_forward_hook(fwd))
        self._seen = seen

    def disarm(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def measure(self) -> None:
        """Errors and statistics of the captured step (a layer without a gradient gets forward errors only)."""
        self.disarm()
        if not self.order:
            self.order = [n for n in self._seen]
        for name, x in self._x.items():
            w = self.layers[name].weight
            dy = self._dy.get(name)
            x2 = x.reshape(-1, x.shape[-1])
            dy2 = None if dy is None else dy.reshape(-1, dy.shape[-1])
            self.shapes[name] = (x2.shape[0], w.shape[1], w.shape[0])
            for k in self.kernels:
                self.errors.setdefault((name, k), _Running()).add(gemm_error(x2, w, dy2, k))
            st = {}
            for tag, t in (("x", x2), ("w", w), ("g", dy2)):
                if t is None:
                    continue
                amax, rms = tensor_stats(t)
                st[f"{tag}_amax"], st[f"{tag}_rms"] = amax, rms
                st[f"{tag}_crest"] = amax / max(rms, _TINY)
            if dy2 is not None:  # gradient entries an e4m3 cast with one scale would flush to zero
                nz = dy2 != 0
                st["g_underflow"] = float(((qdq(dy2.float(), "e4m3") == 0) & nz).sum() / nz.sum().clamp(min=1))
            self.stats[name] = st
        self._x.clear()
        self._dy.clear()
        self.probes += 1


# ---- Dispatch ------------------------------------------------------------------------------------------------
class Dispatch:
    """Per layer, the chosen kernel (module docstring): :meth:`decide` after each probe."""

    def __init__(self, bound: float, mods: Mods = Mods(), costs: CostTable | None = None):
        self.bound, self.mods = bound, mods
        self.costs = costs or CostTable()
        self.choice: dict[str, str] = {}
        self.switches = 0

    def ranked(self, layer: str, shape: tuple[int, int, int], order: list[str]) -> list[str]:
        """The layer's allowed kernels, fastest first."""
        return sorted(self.mods.allowed(layer, order), key=lambda k: self.costs.seconds(layer, k, *shape))

    def decide(self, probe: Probe) -> dict[str, str]:
        for layer, shape in probe.shapes.items():
            cur = self.choice.get(layer, "fp32")
            pick = "fp32"
            for k in self.ranked(layer, shape, probe.order):
                if k == "fp32":
                    break
                r = probe.errors.get((layer, k))
                if r is None or r.n < MIN_PROBES or r.last > self.bound:
                    continue
                limit = self.bound if k == cur else PROMOTE_MARGIN * self.bound
                if r.upper() <= limit:
                    pick = k
                    break
            if pick != cur:
                self.switches += 1
            self.choice[layer] = pick
        return dict(self.choice)


# ---- the trainer's side --------------------------------------------------------------------------------------
class Precision:
    """``trainer.precision`` on a model: the probe, the dispatch and the layers' forward (module docstring).

    The learner calls :meth:`before_step` before each training forward and :meth:`after_backward` after the
    backward; :meth:`stats` is what the trainer reports; :meth:`state` / :meth:`load_state` go with checkpoints."""

    def __init__(self, model: nn.Module, mode: str, *, bound: float = 0.02, probe_every: int = 50,
                 costs: CostTable | None = None, mods: Mods = Mods(), real: bool = False,
                 skip: tuple[str, ...] = ("aux.", "c2al.")):
        if mode not in MODES:
            raise ValueError(f"trainer.precision {mode!r}: must be one of {', '.join(MODES)}")
        self.mode, self.mods, self.real, self.probe_every = mode, mods, real, max(1, probe_every)
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.startswith(skip)}
        self.probe = Probe(self.layers)
        self.dispatch = Dispatch(bound, mods, costs)
        self._step = 0
        for name, lin in self.layers.items():  # the layers become dispatched ones (same parameters, same state)
            lin.__class__ = DispatchedLinear
            lin.loka, lin.loka_name = self, name

    def kernel(self, layer: str) -> str:
        """What the layer runs now: the dispatch's choice (auto), or the mode's kernel within Mods."""
        if self.mode == "fp32":
            return "fp32"
        if self.mode == "auto":
            return self.dispatch.choice.get(layer, "fp32")
        if self.mode == "bf16" or not self.probe.order:  # fp8 before the first probe: the pins are unknown
            return "bf16"
        return "fp8_row" if "fp8_row" in self.mods.allowed(layer, self.probe.order) else "bf16"

    def before_step(self) -> None:
        if self.mode != "fp32" and self._step % self.probe_every == 0:
            self.probe.arm()
        self._step += 1

    def after_backward(self) -> None:
        if self.probe.armed:
            self.probe.measure()
            if self.real and not self.dispatch.costs.measured:  # the device's own speeds, once, at these shapes
                batch = next(iter(self.probe.shapes.values()))[0]
                dev = next(iter(self.layers.values())).weight.device
                self.dispatch.costs = measure_costs(self.layers, batch, dev, reps=5)
            self.dispatch.decide(self.probe)

    def table(self) -> list[dict]:
        """One row per layer, forward order: shape, running kernel, each kernel's mean error, tensor stats."""
        names = self.probe.order or list(self.layers)
        rows = []
        for n in names:
            lin = self.layers[n]
            row = {"layer": n, "k": lin.in_features, "n": lin.out_features, "kernel": self.kernel(n),
                   "pinned": n in self.mods.pinned(self.probe.order)}
            for k in KERNELS[:-1]:
                r = self.probe.errors.get((n, k))
                row[f"err_{k}"] = None if r is None else r.mean
            row.update(self.probe.stats.get(n, {}))
            rows.append(row)
        return rows

    def stats(self) -> dict[str, float]:
        """ServiceStats values: ``precision_probes``, ``precision_switches``, and per layer
        ``precision_kernel/<layer>`` (:data:`KERNEL_CODE`), ``precision_err/<layer>/<kernel>`` (running mean of
        the relative error), ``precision_stat/<layer>/<x|w|g>_<amax|crest>``."""
        out = {"precision_probes": float(self.probe.probes), "precision_switches": float(self.dispatch.switches)}
        for n in self.layers:
            out[f"precision_kernel/{n}"] = float(KERNEL_CODE[self.kernel(n)])
        for (n, k), r in self.probe.errors.items():
            if k != "fp32":
                out[f"precision_err/{n}/{k}"] = r.mean
        for n, st in self.probe.stats.items():
            for key in ("x_amax", "x_crest", "w_amax", "g_amax", "g_crest", "g_underflow"):
                if key in st:
                    out[f"precision_stat/{n}/{key}"] = st[key]
        return out

    def state(self) -> dict:
        return {"step": self._step, "choice": dict(self.dispatch.choice), "switches": self.dispatch.switches,
                "probes": self.probe.probes, "order": list(self.probe.order),
                "errors": {f"{n}|{k}": [r.mean, r.var, r.n, r.last] for (n, k), r in self.probe.errors.items()}}

    def load_state(self, st: dict) -> None:
        self._step = int(st["step"])
        self.dispatch.choice = dict(st["choice"])
        self.dispatch.switches = int(st["switches"])
        self.probe.probes = int(st["probes"])
        self.probe.order = list(st["order"])
        self.probe.errors = {tuple(key.split("|")): _Running(float(m), float(v), int(n), float(last))
                             for key, (m, v, n, last) in st["errors"].items()}


def for_learner(tcfg, model: nn.Module, device: torch.device) -> Precision | None:
    """The learner's :class:`Precision`, or None for ``trainer.precision: fp32``. On a CUDA card with fp8 tensor
    cores (compute capability 8.9 or newer: L4/L40, H100, H200) the forward runs the real kernels and the cost
    table is measured there at the first probe's shapes (:func:`measure_costs`); elsewhere it is emulated."""
    if tcfg.precision == "fp32":
        return None
    return Precision(model, tcfg.precision, bound=tcfg.precision_bound, probe_every=tcfg.precision_probe_every,
                     real=real_kernels(device))


def real_kernels(device: torch.device) -> bool:
    """Whether ``device`` runs fp8 ``_scaled_mm`` (CUDA, compute capability >= 8.9)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
