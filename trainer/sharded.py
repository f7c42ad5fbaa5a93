"""Row-wise sharded embedding tables over ``torch.distributed`` (the multi-rank trainer, trainer/distributed.py).

Why not TorchRec's DistributedModelParallel: checked on this project's CPU stack (torch 2.13.0+cpu, torchrec
1.8.0, fbgemm-gpu-cpu 1.8.0, gloo, 2 processes under ``torch.distributed.run``): DMP runs, but its CPU planner
offers only TABLE_WISE sharding (the fused kernel); asked for ROW_WISE it fails with "No available sharding type
and compute kernel combination ... compute device: cpu". Table-wise puts each whole table on one rank: the ad
and user tables are the hot ones, so ranks are loaded unevenly and a table never outgrows one rank. So the
tables are sharded row-wise here, the way TorchRec's row-wise sharding works, over plain collectives:

* every global slot ``s = t * rows + id`` (the layout of trainer/embeddings.py) belongs to rank ``s % W`` and is
  row ``s // W`` of that rank's local table (``ceil(T * rows / W)`` rows: 1/W of the memory per rank);
* forward, input dist: each rank sends every owner the ids of its batch that the owner holds, with how many per
  bag (one ``all_gather`` of the sizes, one ``all_to_all`` of lengths and ids); each owner pools what it holds
  for every rank's bags in one ``nn.EmbeddingBag`` call (sparse gradients);
* forward, output dist: the partial pooled sums go back to the bags' ranks (``all_to_all``) and are summed:
  a reduce-scatter of pooled embeddings;
* backward: each rank's gradient of its pooled vectors goes to every owner (``all_to_all``), scaled by the
  rank's share of the global batch (``n_r / N``: the gradient of the global batch mean, the same as one process
  training the whole batch); each owner's local ``EmbeddingBag`` gets its sparse gradient and :meth:`step`
  applies the row-wise Adagrad of trainer/embeddings.py to the rows it owns.

Every forward is a collective: all ranks call it the same number of times (a rank with no examples calls it with
an empty batch, :func:`empty_batch_step`). ``export_state`` returns this rank's shard (a checkpoint holds one file
per rank); ``import_state`` takes a shard of the same world size (another rank count is refused by the loader).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from embedding_store.base import SparseEmbeddings
from trainer.embeddings import EPS, INIT_RANGE


# communication spent by this process (``streamrec bench scale`` reads and resets it): seconds and bytes sent
COMM = {"a2a_s": 0.0, "a2a_bytes": 0, "a2a_calls": 0, "allreduce_s": 0.0, "allreduce_bytes": 0, "allreduce_calls": 0}


def _all_gather(out: torch.Tensor, inp: torch.Tensor) -> None:
    """Every rank's ``inp`` side by side in ``out`` (torch 2.13 renamed all_gather_into_tensor)."""
    if hasattr(dist, "all_gather_single"):
        dist.all_gather_single(out, inp)
    else:
        dist.all_gather_into_tensor(out, inp)


def _a2a(chunks: list[torch.Tensor], recv_sizes: list[int], tail: tuple[int, ...], dtype) -> list[torch.Tensor]:
    """``chunks[r]`` goes to rank r; returns what every rank sent here (``recv_sizes[r]`` rows each)."""
    send = torch.cat(chunks) if chunks else torch.zeros((0, *tail), dtype=dtype)
    recv = torch.empty((sum(recv_sizes), *tail), dtype=dtype)
    t0 = time.perf_counter()
    dist.all_to_all_single(recv, send.contiguous(), output_split_sizes=recv_sizes,
                           input_split_sizes=[int(c.shape[0]) for c in chunks])
    COMM["a2a_s"] += time.perf_counter() - t0
    COMM["a2a_bytes"] += (send.numel() - chunks[dist.get_rank()].numel()) * send.element_size()
    COMM["a2a_calls"] += 1
    return list(recv.split(recv_sizes))


class _PooledExchange(torch.autograd.Function):
    """Forward: partial pooled sums for every rank's bags -> the sum for this rank's bags. Backward: this
    rank's pooled gradient (scaled by its batch share) -> every owner."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, bags: list[int], share: float) -> torch.Tensor:
        world, me = dist.get_world_size(), dist.get_rank()
        ctx.bags, ctx.share = bags, share
        width = partial.shape[1]
        got = _a2a(list(partial.split(bags)), [bags[me]] * world, (width,), partial.dtype)
        return torch.stack(got).sum(0) if got else partial.new_zeros(bags[me], width)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        world = dist.get_world_size()
        g = (grad * ctx.share).contiguous()
        back = _a2a([g] * world, ctx.bags, (g.shape[1],), g.dtype)
        return torch.cat(back), None, None


class ShardedEmbeddings(SparseEmbeddings):
    """``T`` tables of ``rows`` x ``dim``, row-wise over the ranks of the default process group (see module
    docstring). Same TBE input and ``(B, T*D)`` output as trainer/embeddings.py; ``share`` (this rank's
    examples / the global batch) is set by the trainer before each step."""

    def __init__(self, num_tables: int, rows: int, dim: int, lr: float, device: torch.device):
        super().__init__()
        if device.type != "cpu":
            raise ValueError("trainer.device: the sharded embeddings (trainer/sharded.py) run on the CPU with gloo")
        self.num_tables, self.rows, self.dim, self.lr = num_tables, rows, dim, lr
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        total = num_tables * rows
        self.local_rows = math.ceil(total / self.world)
        self.bag = nn.EmbeddingBag(self.local_rows, dim, mode="sum", sparse=True, include_last_offset=True)
        g = torch.Generator().manual_seed(1000 + self.rank)
        with torch.no_grad():
            self.bag.weight.uniform_(-INIT_RANGE, INIT_RANGE, generator=g)
        self.register_buffer("momentum", torch.zeros(self.local_rows))
        self.share = 1.0

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        W, T, me = self.world, self.num_tables, self.rank
        tb = offsets.numel() - 1
        b = tb // T
        n = indices.numel()
        bag_of = torch.repeat_interleave(torch.arange(tb), offsets.diff(), output_size=n)
        slots = indices.long() + (bag_of // max(b, 1)) * self.rows
        owner = slots % W
        order = torch.argsort(owner, stable=True)  # ids grouped by owner, bag order kept within
        send_len = torch.bincount(owner * tb + bag_of, minlength=W * tb).view(W, tb)  # per owner, per bag
        id_counts = send_len.sum(1)
        # one all-gather: every rank's batch size and how many ids it sends each owner
        meta = torch.zeros(W * (W + 1), dtype=torch.long)
        _all_gather(meta, torch.cat([torch.tensor([b]), id_counts]))
        meta = meta.view(W, W + 1)
        bags_l = meta[:, 0].tolist()
        from_ids = meta[:, 1 + me].tolist()
        # input dist, one all-to-all: per owner [bag lengths (T*B), its local row ids]
        local = (slots // W)[order]
        chunks = [torch.cat([send_len[r], c]) for r, c in enumerate(local.split(id_counts.tolist()))]
        recv = _a2a(chunks, [T * bags_l[r] + from_ids[r] for r in range(W)], (), torch.long)
        lens = torch.cat([x[:T * bags_l[r]] for r, x in enumerate(recv)])
        ids = torch.cat([x[T * bags_l[r]:] for r, x in enumerate(recv)])
        off = torch.zeros(lens.numel() + 1, dtype=torch.long)
        torch.cumsum(lens, 0, out=off[1:])
        pooled = self.bag(ids, off)  # (sum T*B_r, D): rank r's bags in its TBE order (t*B_r + i), ranks in turn
        parts = [x.view(T, bags_l[r], self.dim).transpose(0, 1).reshape(bags_l[r], T * self.dim)
                 for r, x in enumerate(pooled.split([T * n_r for n_r in bags_l]))]
        return _PooledExchange.apply(torch.cat(parts), bags_l, float(self.share))

    @torch.no_grad()
    def step(self) -> None:
        g = self.bag.weight.grad
        if g is None:
            return
        g = g.coalesce()
        rows, vals = g.indices()[0], g.values()
        m = self.momentum[rows] + vals.pow(2).mean(dim=1)
        self.momentum[rows] = m
        self.bag.weight[rows] -= (self.lr / (m.sqrt() + EPS)).unsqueeze(1) * vals
        self.bag.weight.grad = None

    def memory_report(self) -> dict[str, float]:
        from streams.names import Stat
        return {f"{Stat.EMBEDDING_BYTES_PREFIX}{self.dim}": float(self.local_rows * 4 * (self.dim + 1)),
                f"{Stat.EMBEDDING_ROWS_PREFIX}{self.dim}": float(self.local_rows)}

    @torch.no_grad()
    def export_state(self) -> dict[str, torch.Tensor]:
        return {"shard_weights": self.bag.weight.detach().clone(), "shard_momentum": self.momentum.detach().clone(),
                "world": torch.tensor(self.world), "rank": torch.tensor(self.rank)}

    @torch.no_grad()
    def import_state(self, state: dict[str, torch.Tensor]) -> None:
        if "shard_weights" not in state:
            raise ValueError("embedding state: a single-process checkpoint cannot be loaded into sharded tables "
                             "(start over with --fresh, or resume with one rank)")
        w, r = int(state["world"]), int(state["rank"])
        if (w, r) != (self.world, self.rank) or tuple(state["shard_weights"].shape) != (self.local_rows, self.dim):
            raise ValueError(f"embedding shard of rank {r}/{w} with shape {tuple(state['shard_weights'].shape)} "
                             f"does not fit rank {self.rank}/{self.world} ({self.local_rows}, {self.dim})")
        self._note_import()
        self.bag.weight.copy_(state["shard_weights"])
        self.momentum.copy_(state["shard_momentum"])

    def serving_rows(self, slots):  # noqa: D102 - a shard cannot serve: exports need every rank's rows
        raise NotImplementedError("sharded embeddings hold 1/W of the rows: no serving export from one rank")


@contextmanager
def sharded_tables():
    """Models built inside get this rank's shard as their tables (trainer/model.py's ``make_embeddings``), so a
    rank never allocates the whole tables, not even while it starts."""
    import trainer.model as model_module

    orig = model_module.make_embeddings

    def make(backend, num_tables, rows, dim, lr, device, fiited=None):
        return ShardedEmbeddings(num_tables, rows, dim, lr, torch.device("cpu"))

    model_module.make_embeddings = make
    try:
        yield
    finally:
        model_module.make_embeddings = orig


def shard_learner(learner) -> DenseGradSync:
    """Make ``learner`` (trainer/model.py) one rank's: its embedding tables this rank's row-wise shard (built
    under :func:`sharded_tables`, or replaced here), its dense gradients summed over the ranks after each
    backward; returns the gradient sync."""
    tc, model = learner.tcfg, learner.model
    learner.device = torch.device("cpu")
    if not isinstance(model.emb, ShardedEmbeddings):
        model.emb = ShardedEmbeddings(model.num_tables, tc.hash_buckets, tc.embedding_dim, tc.lr_sparse,
                                      learner.device)
    learner.backend = "sharded"
    learner.grad_sync = DenseGradSync(learner.dense_params)
    return learner.grad_sync


def empty_batch_step(learner) -> None:
    """A rank with no examples in a global step: take part in the embedding collectives (owners pool other
    ranks' bags and receive their gradients), in the dense gradient all-reduce (its share is 0), and apply the
    same updates as every other rank, so that dense weights and optimizer states stay identical."""
    emb = learner.model.emb
    emb.share = 0.0
    learner.opt.zero_grad(set_to_none=True)
    out = emb(torch.zeros(0, dtype=torch.long), torch.zeros(emb.num_tables * 0 + 1, dtype=torch.long))
    torch.autograd.backward(out, torch.zeros_like(out))
    learner.grad_sync()
    learner.opt.step()
    emb.step()
    learner.steps += 1


class DenseGradSync:
    """After backward: every dense gradient times this rank's share of the global batch, summed over the ranks
    in one flat all-reduce (the gradient of the global batch mean); a missing gradient counts as zeros, so every
    rank applies the same update to the same parameters."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.share = 1.0

    def __call__(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads]) * self.share
        t0 = time.perf_counter()
        dist.all_reduce(flat)
        COMM["allreduce_s"] += time.perf_counter() - t0
        COMM["allreduce_bytes"] += flat.numel() * flat.element_size()
        COMM["allreduce_calls"] += 1
        i = 0
        for p in self.params:
            n = p.numel()
            p.grad = flat[i:i + n].view_as(p).clone()
            i += n
