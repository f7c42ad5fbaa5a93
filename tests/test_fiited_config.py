"""trainer.fiited -> FiitedConfig: defaults from the trainer, overrides from file/env, errors naming the field."""

from __future__ import annotations

import pytest
import torch

from embedding_store.config import trainer_config
from embedding_store.fiited import FiitedEmbeddings
from config import load_config
from trainer.embeddings import make_embeddings

CPU = torch.device("cpu")


def test_env_overrides_reach_the_store():
    cfg = load_config(env={"STREAMREC_TRAINER__BACKEND": "fiited", "STREAMREC_TRAINER__EMBEDDING_DIM": "32",
                           "STREAMREC_TRAINER__FIITED__BUDGET": "0.3",
                           "STREAMREC_TRAINER__FIITED__POOL_CHUNKS": "[1, 4]",
                           "STREAMREC_TRAINER__FIITED__ADMIT_HITS": "3"})
    tc = cfg.trainer
    emb = make_embeddings(tc.backend, 2, 100, tc.embedding_dim, tc.lr_sparse, CPU, tc.fiited)
    assert isinstance(emb, FiitedEmbeddings)
    assert (emb.cfg.budget, emb.cfg.admit_hits, emb.cfg.pool_chunks) == (0.3, 3, (1, 4))
    assert emb.dims == (8, 32) and emb.cfg.lr == tc.lr_sparse  # chunks of 8 make up dim 32; lr from the trainer
    assert tuple(emb(torch.tensor([1, 2]), torch.tensor([0, 1, 2])).shape) == (1, 64)


def test_defaults_follow_the_trainer_dim():
    assert trainer_config({}, 64, 0.1).pool_dims() == (8, 16, 32, 64)
    assert trainer_config(None, 16, 0.1).pool_dims() == (8, 16)  # default widths wider than dim are dropped
    c = trainer_config({"budget": 1, "resize_every": 100.0}, 12, 0.1)  # ints for floats, integral floats for ints
    assert c.pool_dims() == (4, 8, 12) and c.budget == 1.0 and c.resize_every == 100


@pytest.mark.parametrize("over,msg", [
    ({"budgit": 0.3}, r"trainer\.fiited\.budgit: unknown field"),
    ({"budget": "lots"}, r"trainer\.fiited\.budget: expected float"),
    ({"budget": 0.0}, r"trainer\.fiited\.budget: expected in \(0, 1.5\]"),
    ({"admit_hits": True}, r"trainer\.fiited\.admit_hits: expected int"),
    ({"admit_hits": 1.5}, r"trainer\.fiited\.admit_hits: expected int"),
    ({"pool_chunks": [4, 1, 8]}, r"trainer\.fiited\.pool_chunks: expected ascending"),
    ({"pool_chunks": [1, "two", 8]}, r"trainer\.fiited\.pool_chunks\[1\]: expected int, got str"),
    ({"resize_every": 75}, r"trainer\.fiited\.resize_every: expected a multiple of maintain_every"),
    ({"chunk_dim": 24}, r"trainer\.fiited\.chunk_dim: expected a positive divisor"),
    ({"num_chunks": 4}, r"trainer\.fiited\.(chunk_dim|pool_chunks)"),
    ([("budget", 0.3)], r"trainer\.fiited: expected a mapping"),
])
def test_bad_values_name_the_field(over, msg):
    with pytest.raises(ValueError, match=msg):
        make_embeddings("fiited", 2, 100, 64, 0.05, CPU, over)


def test_an_unknown_or_mistyped_field_fails_when_the_configuration_loads():
    from config import ConfigError

    with pytest.raises(ConfigError, match=r"unknown field `budgit` - at `\$\.trainer\.fiited`"):
        load_config(env={"STREAMREC_TRAINER__FIITED__BUDGIT": "0.3"})
    with pytest.raises(ConfigError, match=r"at `\$\.trainer\.fiited\.admit_hits`"):
        load_config(env={"STREAMREC_TRAINER__FIITED__ADMIT_HITS": "lots"})


def test_bad_env_value_fails_when_the_store_is_built():
    tc = load_config(env={"STREAMREC_TRAINER__FIITED__DECAY": "2"}).trainer  # typed; ranges checked by the store
    with pytest.raises(ValueError, match=r"trainer\.fiited\.decay: expected in \[0, 1\], got 2.0"):
        make_embeddings("fiited", 2, 100, tc.embedding_dim, tc.lr_sparse, CPU, tc.fiited)
