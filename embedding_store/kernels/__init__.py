"""FIITED's lookup kernel: every pool's rows gathered, sum-pooled per bag and written straight into the zero-padded
(B, T*D) layout the model consumes, in one pass; the backward fused with the row-wise Adagrad update.

Why this tool. fbgemm's TBE (the old path, ``kernel="fbgemm"``) cannot carry per-row widths: FIITED ran it over
T*P pool tables after a routing sort, then padded the per-pool outputs (``_Pad``): about twice the fixed-width
cost. fbgemm's mixed-dimension support is per *table*, not per row, so it has the same shape problem. The kernel
is small (a gather-add over bags and a grouped update), so it is written here twice:

* ``cpp``: a C++ operator (``fiited_kernel.cpp``) registered with ``TORCH_LIBRARY`` and compiled with the machine's
  ``g++`` against the installed torch's headers: no ninja, no pybind, no Python headers (plain ``g++ -shared``, so
  a fresh CI machine needs nothing beyond the compiler every machine here has). Threads come from ATen's
  ``parallel_for`` (OpenMP in the torch builds we ship), over bags in the forward and over distinct rows in the
  update, so it shares torch's thread pool rather than starting a second OpenMP runtime. The ``.so`` is cached
  under ``$STREAMREC_KERNEL_CACHE`` (default ``$XDG_CACHE_HOME/streamrec/kernels``, i.e. ``~/.cache/...``), in a
  directory keyed by the hash of the source, the compile command and the torch version; built by
  ``streamrec build-kernels`` (``scripts/bootstrap.sh`` runs it) and lazily, under a file lock, on first use.
* ``torch``: the same math in torch ops (``index_select`` / ``index_add_`` / ``unique``): runs on any device, and is
  the CUDA path today (Triton would be the next step on a GPU; it cannot be tested on these machines).

Both match fbgemm's ``EXACT_ROWWISE_ADAGRAD`` on the CPU: gradients of the same physical row in one batch are
summed first, then per row ``m += sum(g^2)/d``, ``w -= g * lr / (sqrt(m) + eps)`` (float32); a narrow row's
gradient is the first ``d`` columns of its bag's output gradient. ``embedding_store/reference.py`` is the oracle
(tests/test_fiited_kernel.py).

Which one runs: :func:`resolve` of ``FiitedConfig.kernel`` (``auto`` | ``cpp`` | ``torch`` | ``fbgemm``),
overridden by ``$STREAMREC_FIITED_KERNEL``; ``auto`` = ``cpp`` on the CPU when it builds, else ``torch``.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from embedding_store.config import POOL_SHIFT, ROW_MASK

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("fiited_kernel.cpp")
LIB_NAME = "fiited_kernel.so"
KERNELS = ("auto", "cpp", "torch", "fbgemm")
ENV = "STREAMREC_FIITED_KERNEL"

_loaded: str | None = None  # path of the library loaded into this process
_failed: str | None = None  # why the build failed (auto then uses the torch path; asked-for cpp raises)


def cache_root() -> Path:
    if os.environ.get("STREAMREC_KERNEL_CACHE"):
        return Path(os.environ["STREAMREC_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "streamrec" / "kernels"


def compile_command(src: Path, out: Path) -> list[str]:
    """``g++`` building ``src`` into a shared library linked against the running torch."""
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "g++")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    cmd += [f"-I{p}" for p in cpp_extension.include_paths()]
    cmd += [str(src), "-o", str(out)]
    libs = cpp_extension.library_paths()
    cmd += [f"-L{p}" for p in libs] + [f"-Wl,-rpath,{p}" for p in libs] + ["-lc10", "-ltorch_cpu"]
    return cmd


def build_dir() -> Path:
    """Cache directory of this source, compile command and torch version."""
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(" ".join(compile_command(Path("SRC"), Path("OUT"))).encode())
    h.update(torch.__version__.encode())
    return cache_root() / f"fiited-{h.hexdigest()[:16]}"


def build(force: bool = False) -> Path:
    """Compile the C++ kernel into the cache (once: a file lock makes concurrent callers wait for one build).
    Returns the library's path; raises ``RuntimeError`` with the compiler's output when it fails."""
    d = build_dir()
    lib = d / LIB_NAME
    if lib.exists() and not force:
        return lib
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        if lib.exists() and not force:
            return lib
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=d)
        os.close(fd)
        cmd = compile_command(SOURCE, Path(tmp))
        log.info("fiited kernel: building %s", lib)
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"fiited kernel: build failed ({shlex.join(cmd[:1])} exit {r.returncode}):\n"
                               f"{(r.stderr or r.stdout)[-4000:]}")
        os.replace(tmp, lib)  # atomic: a reader never sees half a library
    return lib


def load() -> bool:
    """Build if missing and load the C++ operators into this process; False (reason logged once) when it fails."""
    global _loaded, _failed
    if _loaded:
        return True
    if _failed is not None:
        return False
    try:
        lib = build()
        torch.ops.load_library(str(lib))
        _loaded = str(lib)
        return True
    except (RuntimeError, OSError) as e:
        _failed = str(e)
        log.warning("fiited kernel: C++ kernel unavailable, using the torch path: %s", e)
        return False


def resolve(kernel: str, device: torch.device, use_env: bool = True) -> str:
    """The kernel that runs: ``$STREAMREC_FIITED_KERNEL`` if set (and ``use_env``), else ``kernel``; ``auto`` =
    ``cpp`` on the CPU when it builds, else ``torch``. ``fbgemm`` (host pools) and ``cpp`` are CPU only."""
    k = (os.environ.get(ENV) if use_env else None) or kernel
    if k not in KERNELS:
        raise ValueError(f"fiited kernel: expected one of {KERNELS}, got {k!r} (FiitedConfig.kernel / ${ENV})")
    if k == "auto":
        return "cpp" if device.type == "cpu" and load() else "torch"
    if k in ("cpp", "fbgemm") and device.type != "cpu":
        raise ValueError(f"fiited kernel {k!r} runs on the CPU only, got device {device} (use torch or auto)")
    if k == "cpp" and not load():
        raise RuntimeError(f"fiited kernel 'cpp' asked for but it does not build: {_failed}")
    return k


# -- the torch path: the same math on any device --------------------------------------------------------------
def _layout(codes, offsets, woff, moff, dims, B):
    """Per id: (bag, table, width, first weight index, momentum index)."""
    n = codes.numel()
    bag = torch.repeat_interleave(torch.arange(offsets.numel() - 1, device=codes.device), offsets.diff(),
                                  output_size=n)
    t = bag // B
    code = codes.long()
    p = code >> POOL_SHIFT
    row = code & ROW_MASK
    tp = t * dims.numel() + p
    d = dims[p]
    return bag, t, d, woff[tp] + row * d, moff[tp] + row


def torch_forward(weights, codes, offsets, woff, dims, B: int, D: int) -> torch.Tensor:
    tb = offsets.numel() - 1
    T = tb // B
    bag, _, d, base, _ = _layout(codes, offsets, woff, woff, dims, B)
    cols = torch.arange(D, device=weights.device)
    mask = cols < d[:, None]  # (N, D): the row's own columns
    vals = weights[torch.where(mask, base[:, None] + cols, 0)] * mask
    out = torch.zeros(tb, D, dtype=weights.dtype, device=weights.device).index_add_(0, bag, vals)
    return out.view(T, B, D).transpose(0, 1).reshape(B, T * D)


def torch_backward_update(grad, codes, offsets, weights, momentum, woff, moff, dims, B: int, D: int,
                          lr: float, eps: float) -> None:
    if codes.numel() == 0:
        return
    tb = offsets.numel() - 1
    T = tb // B
    bag, _, d, base, mrow = _layout(codes, offsets, woff, moff, dims, B)
    g_bag = grad.reshape(B, T, D).transpose(0, 1).reshape(tb, D)
    cols = torch.arange(D, device=grad.device)
    mask = cols < d[:, None]
    rows, inv = torch.unique(mrow, return_inverse=True)  # one group per physical row
    g = torch.zeros(len(rows), D, dtype=grad.dtype, device=grad.device).index_add_(0, inv, g_bag[bag] * mask)
    first = torch.zeros(len(rows), dtype=torch.long, device=grad.device).scatter_(
        0, inv, torch.arange(len(inv), device=grad.device))  # any occurrence: same row, same base and width
    d_u, base_u = d[first], base[first]
    mom = momentum[rows] + (g * g).sum(1) / d_u
    momentum[rows] = mom
    step = g * (lr / (mom.sqrt() + eps))[:, None]
    m_u = cols < d_u[:, None]
    weights.index_add_(0, (base_u[:, None] + cols)[m_u], -step[m_u])


class Lookup(torch.autograd.Function):
    """Forward (B, T*D); backward updates ``weights`` and ``momentum`` in place and returns no gradients (the
    store is trained by its own optimizer, like fbgemm's TBE). ``anchor`` is a 0-element tensor that requires grad
    so the output joins the autograd graph."""

    @staticmethod
    def forward(ctx, anchor, kernel: str, weights, momentum, codes, offsets, woff, moff, dims, B: int, D: int,
                lr: float, eps: float):
        fwd = torch.ops.streamrec_fiited.forward if kernel == "cpp" else torch_forward
        out = fwd(weights, codes, offsets, woff, dims, B, D)
        ctx.kernel, ctx.B, ctx.D, ctx.lr, ctx.eps = kernel, B, D, lr, eps
        ctx.state = (weights, momentum, codes, offsets, woff, moff, dims)  # weights are updated, not saved
        return out

    @staticmethod
    def backward(ctx, grad):
        weights, momentum, codes, offsets, woff, moff, dims = ctx.state
        upd = torch.ops.streamrec_fiited.backward_update if ctx.kernel == "cpp" else torch_backward_update
        with torch.no_grad():
            upd(grad.contiguous(), codes, offsets, weights, momentum, woff, moff, dims, ctx.B, ctx.D, ctx.lr, ctx.eps)
        return (None,) * 13


def add_cli(sub) -> None:
    p = sub.add_parser("build-kernels", help="compile the C++ kernels into the user's cache (FIITED lookup)",
                       description="Build embedding_store/kernels/fiited_kernel.cpp with g++ against the installed "
                       "torch into $STREAMREC_KERNEL_CACHE (default ~/.cache/streamrec/kernels). Done lazily on "
                       "first use too; this makes it happen at install time.")
    p.add_argument("--force", action="store_true", help="rebuild even if the cached library exists")
    p.set_defaults(func=lambda args, cfg: _cli(args.force))


def _cli(force: bool) -> int:
    try:
        lib = build(force=force)
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    torch.ops.load_library(str(lib))
    print(f"fiited kernel: {lib}")
    return 0
