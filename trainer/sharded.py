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
  bag (one ``all_gather`` of the sizes, one ``all_to_all`` of lengths and ids); bags go example-major (example
  i, table t: bag ``i*T + t``), so an owner's pooled rows for a rank are that rank's ``(B, T*D)`` output as they
  are; each owner pools what it holds for every rank's bags in one ``nn.EmbeddingBag`` call (sparse gradients);
* forward, output dist: the partial pooled sums go back to the bags' ranks (``all_to_all``) and are summed:
  a reduce-scatter of pooled embeddings;
* backward: the output is a leaf, so ``loss.backward()`` stops there; then (:meth:`ShardedEmbeddings.
  exchange_grads`, called by :class:`DenseGradSync`) each rank's gradient of its pooled vectors, scaled by the
  rank's share of the global batch (``n_r / N``: the gradient of the global batch mean, the same as one process
  training the whole batch), goes to every owner in one ``all_to_all``, with the dense gradients riding along
  at 2 ranks; each owner backpropagates them into its local ``EmbeddingBag`` (sparse gradient) and :meth:`step`
  applies the row-wise Adagrad of trainer/embeddings.py to the rows it owns.

Four collectives a step (with 2 ranks; a fifth, the dense all-reduce, with more), what each costs being
mostly gloo's fixed CPU per collective at this model's sizes. No rank sends itself anything through gloo (its
own chunk of every all-to-all stays a view: gloo's copy to itself costs about what sending to a peer does).

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


# the dense gradients ride in the embeddings' backward all-to-all up to this many ranks (DenseGradSync)
FUSE_DENSE_MAX_WORLD = 2
# communication spent by this process (``streamrec bench scale`` reads and resets it): seconds and bytes sent
COMM = {"a2a_s": 0.0, "a2a_bytes": 0, "a2a_calls": 0, "allreduce_s": 0.0, "allreduce_bytes": 0, "allreduce_calls": 0}


def _all_gather(out: torch.Tensor, inp: torch.Tensor) -> None:
    """Every rank's ``inp`` side by side in ``out`` (torch 2.13 renamed all_gather_into_tensor)."""
    if hasattr(dist, "all_gather_single"):
        dist.all_gather_single(out, inp)
    else:
        dist.all_gather_into_tensor(out, inp)


def _a2a(send: torch.Tensor, send_sizes: list[int], recv_sizes: list[int]) -> list[torch.Tensor]:
    """Rows ``send_sizes[r]`` of ``send`` (in rank order) go to rank r; returns what every rank sent here, one
    tensor per rank (``recv_sizes[r]`` rows from rank r). This rank's own chunk does not go through gloo (a view
    of ``send``): gloo's copy to itself costs about as much CPU as sending it to a peer."""
    me = dist.get_rank()
    lo, hi = sum(send_sizes[:me]), sum(send_sizes[:me + 1])
    others = send[hi:] if lo == 0 else send[:lo] if hi == send.shape[0] else torch.cat([send[:lo], send[hi:]])
    parts = _exchange(others, [0 if r == me else x for r, x in enumerate(send_sizes)], recv_sizes)
    parts[me] = send[lo:hi]
    return parts


def _exchange(others: torch.Tensor, send_sizes: list[int], recv_sizes: list[int]) -> list[torch.Tensor]:
    """The all-to-all of :func:`_a2a`: ``others`` holds the chunks for the other ranks (``send_sizes`` 0 for
    this one); returns one tensor per rank (this rank's: empty)."""
    r_sizes = list(recv_sizes)
    r_sizes[dist.get_rank()] = 0
    recv = others.new_empty((sum(r_sizes), *others.shape[1:]))
    t0 = time.perf_counter()
    dist.all_to_all_single(recv, others.contiguous(), output_split_sizes=r_sizes, input_split_sizes=send_sizes)
    COMM["a2a_s"] += time.perf_counter() - t0
    COMM["a2a_bytes"] += others.numel() * others.element_size()
    COMM["a2a_calls"] += 1
    return list(recv.split(r_sizes))


class ShardedEmbeddings(SparseEmbeddings):
    """``T`` tables of ``rows`` x ``dim``, row-wise over the ranks of the default process group (see module
    docstring). Same TBE input and ``(B, T*D)`` output as trainer/embeddings.py; ``share`` (this rank's
    examples / the global batch) is set by the trainer before each step.

    The output is a leaf: ``backward()`` stops at it, and its gradient reaches the owners' rows in
    :meth:`exchange_grads` (the trainer's :class:`DenseGradSync` calls it with the dense gradients, so both go
    in one collective; :meth:`step` calls it when nothing did)."""

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
        # the last forward's (pooled rows of every rank's bags, examples per rank, this rank's output leaf)
        self._pending: tuple[torch.Tensor, list[int], torch.Tensor] | None = None

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        W, T, me = self.world, self.num_tables, self.rank
        tb = offsets.numel() - 1
        b = tb // T
        n = indices.numel()
        # example-major bags (bag i*T + t: example i, table t), so that an owner's pooled rows for a rank are
        # that rank's (b, T*D) output as they are: no transposes on either side of the exchange
        lens = offsets.diff().view(T, b).t().reshape(-1)
        start = offsets[:-1].view(T, b).t().reshape(-1)
        off_em = torch.zeros(tb + 1, dtype=torch.long)
        torch.cumsum(lens, 0, out=off_em[1:])
        bag_ix = torch.arange(tb)
        per_bag = torch.stack([start - off_em[:-1], (bag_ix % T) * self.rows], 1)
        per_id = torch.repeat_interleave(per_bag, lens, dim=0, output_size=n)  # (n, 2): source shift, table
        slots = indices.long()[per_id[:, 0] + torch.arange(n)] + per_id[:, 1]
        owner = slots % W
        # per owner: a running count of its ids (an id's rank among its owner's ids, stable: no sort) and how
        # many ids of each bag it holds (differences of the count at the bags' ends)
        count = torch.zeros(n + 1, W, dtype=torch.long)
        torch.cumsum(torch.nn.functional.one_hot(owner, W), 0, out=count[1:])
        within = count[1:].gather(1, owner[:, None]).squeeze(1) - 1
        ends = count[off_em]  # (T*B + 1, W)
        send_len = (ends[1:] - ends[:-1]).t()  # (W, T*B): per owner, per bag
        id_counts = ends[-1]
        # one all-gather: every rank's batch size and how many ids it sends each owner
        meta = torch.zeros(W * (W + 1), dtype=torch.long)
        _all_gather(meta, torch.cat([torch.tensor([b]), id_counts]))
        meta = meta.view(W, W + 1)
        bags_l = meta[:, 0].tolist()
        from_ids = meta[:, 1 + me].tolist()
        # input dist, one all-to-all: per owner [bag lengths (T*B), its local row ids in bag order], written in
        # place (an id's place: its owner's chunk, then its rank among that owner's ids: stable, no sort)
        chunk = torch.arange(W) * tb + torch.cumsum(id_counts, 0) - id_counts  # each owner's chunk start
        send = torch.empty(W * tb + n, dtype=torch.long)
        send[(chunk[:, None] + torch.arange(tb)).view(-1)] = send_len.reshape(-1)
        send[chunk[owner] + tb + within] = slots // W
        sizes_in = [T * bags_l[r] + from_ids[r] for r in range(W)]
        pieces = _a2a(send, (id_counts + tb).tolist(), sizes_in)
        off = torch.zeros(T * sum(bags_l) + 1, dtype=torch.long)
        torch.cumsum(torch.cat([x[:T * bags_l[r]] for r, x in enumerate(pieces)]), 0, out=off[1:])
        # (sum B_r*T, D): rank r's bags example-major, ranks in turn
        pooled = self.bag(torch.cat([x[T * bags_l[r]:] for r, x in enumerate(pieces)]), off)
        # output dist, one all-to-all: the partial sums for rank r's bags go to rank r, which adds them up
        with torch.no_grad():
            got = _a2a(pooled.detach(), [T * x for x in bags_l], [T * b] * W)
            out = got[0].view(b, T * self.dim) if W > 1 else got[0].view(b, T * self.dim).clone()
            for x in got[1:]:  # in rank order
                out = out + x.view(b, T * self.dim)
        if not torch.is_grad_enabled():
            return out
        out.requires_grad_()
        self._pending = (pooled, bags_l, out)
        return out

    def exchange_grads(self, dense: torch.Tensor | None = None) -> torch.Tensor | None:
        """Backward of the last forward's exchange: this rank's output gradient (times ``share``) goes to every
        owner, which backpropagates every rank's into its pooled rows (sparse gradient of its shard). ``dense``
        (flat, already weighted) rides along: returns its sum over the ranks. One all-to-all (at 2 ranks it moves
        the bytes that an all-to-all of the gradients and a ring all-reduce of ``dense`` would)."""
        W, T, D = self.world, self.num_tables, self.dim
        if self._pending is None:
            raise RuntimeError("ShardedEmbeddings.exchange_grads: no forward with gradients to finish")
        pooled, bags_l, out = self._pending
        self._pending = None
        p = 0 if dense is None else dense.numel()
        n = bags_l[self.rank] * T * D
        flat = torch.empty(n + p)
        if out.grad is not None:
            torch.mul(out.grad.reshape(-1), self.share, out=flat[:n])
        else:
            flat[:n] = 0
        if dense is not None:
            flat[n:] = dense
        me = self.rank
        every = _exchange(flat if W == 2 else flat.repeat(W - 1), [0 if r == me else n + p for r in range(W)],
                          [x * T * D + p for x in bags_l])
        every[me] = flat
        grad = torch.cat([x[:bags_l[r] * T * D] for r, x in enumerate(every)]).view(-1, D)
        pooled.backward(grad)
        if dense is None:
            return None
        total = every[0][bags_l[0] * T * D:]
        for r in range(1, W):  # in rank order
            total = total + every[r][bags_l[r] * T * D:]
        return total

    @torch.no_grad()
    def step(self) -> None:
        if self._pending is not None:  # used without DenseGradSync (tests): the embeddings' exchange alone
            with torch.enable_grad():
                self.exchange_grads()
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
    learner.grad_sync = DenseGradSync(learner.dense_params, model.emb)
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
    (the gradient of the global batch mean); a missing gradient counts as zeros, so every rank applies the same
    update to the same parameters. Also finishes the embeddings' backward (:meth:`ShardedEmbeddings.exchange_grads`).

    With 2 ranks both ride in one all-to-all (each rank receives the other's flat gradients: the bytes of a ring
    all-reduce, and one collective fewer per step: on gloo a collective's fixed CPU cost is worth more than its
    bytes); with more, sending every rank the dense gradients would move (W-1) copies where a ring all-reduce
    moves 2 (W-1)/W, so they take their own all-reduce. The summed gradients are views of one flat buffer (as
    DDP's ``gradient_as_bucket_view``)."""

    def __init__(self, params: list[torch.nn.Parameter], emb: ShardedEmbeddings | None = None):
        self.params = params
        self.emb = emb
        self.share = 1.0

    def __call__(self) -> None:
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params])
        flat.mul_(self.share)
        pending = self.emb is not None and self.emb._pending is not None
        if pending and dist.get_world_size() <= FUSE_DENSE_MAX_WORLD:
            flat = self.emb.exchange_grads(flat)  # counted with the all-to-alls
        else:
            if pending:
                self.emb.exchange_grads()
            t0 = time.perf_counter()
            dist.all_reduce(flat)
            COMM["allreduce_s"] += time.perf_counter() - t0
            COMM["allreduce_bytes"] += flat.numel() * flat.element_size()
            COMM["allreduce_calls"] += 1
        i = 0
        for p in self.params:
            n = p.numel()
            p.grad = flat[i:i + n].view_as(p)
            i += n
