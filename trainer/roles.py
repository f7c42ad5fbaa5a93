"""What ``trainer.role`` means by default: the foundation model (FM) and its vertical students (VMs).

``role`` (config ``trainer.role``) is ``ranker`` (today's single model: nothing changes), ``fm`` or ``vm``
(docs/transfer.md). :func:`role_config` applies the role's *preset* to a :class:`~config.TrainerConfig`:

====================  ===================  ==================  =================================================
field                 TrainerConfig        fm                  vm
====================  ===================  ==================  =================================================
hash_buckets          100,000              200,000             25,000 (smaller tables)
embedding_dim         16                   24                  8
history_len           8                    32 (longest)        4 (shorter histories)
cat_slots             4                    4                   2 (fewer features)
user_model            True                 True (the LLaTTE    False (no FM-sized user side on a VM's serving
                                           user side)          path; LoopFM brings the FM's instead)
teacher_weight        0                    0                   1.0 (distil from the FM's predictions)
====================  ===================  ==================  =================================================

A VM trains only the examples of its ``vm_domains`` (empty: all, :func:`serves`); the trainer counts the rest as
``examples_other_domain``. The FM trains everything.

Fields set explicitly are left alone. A frozen config cannot tell "set to the default" from "not set", so a
field still equal to the :class:`~config.TrainerConfig` default takes the preset, and any other value is kept;
pass ``explicit`` (the names the user set, e.g. from the config file and the environment) to keep a field even
where its value equals the default.

>>> from config import TrainerConfig
>>> vm = role_config(TrainerConfig(role="vm", history_len=6))
>>> vm.hash_buckets, vm.embedding_dim, vm.history_len, vm.user_model, vm.teacher_weight
(25000, 8, 6, False, 1.0)
>>> role_config(TrainerConfig(role="vm", user_model=True), explicit={"user_model"}).user_model
True
>>> role_config(TrainerConfig()) == TrainerConfig()
True
"""

from __future__ import annotations

from typing import Iterable

import msgspec

from config import ConfigError, TrainerConfig

ROLES = ("ranker", "fm", "vm")

PRESETS: dict[str, dict[str, object]] = {
    "ranker": {},
    # 12 tables x 200k rows x 24 dims: 230 MB of weights (the ranker's default: 77 MB), so that an FM, its
    # checkpoints and VMs still fit a laptop beside the rest of the stack
    "fm": {"hash_buckets": 200_000, "embedding_dim": 24, "history_len": 32, "cat_slots": 4, "user_model": True},
    "vm": {"hash_buckets": 25_000, "embedding_dim": 8, "history_len": 4, "cat_slots": 2, "user_model": False,
           "teacher_weight": 1.0},
}

_DEFAULTS = TrainerConfig()


def role_config(tcfg: TrainerConfig, explicit: Iterable[str] = ()) -> TrainerConfig:
    """``tcfg`` with its role's preset applied to the fields still at their defaults and not in ``explicit``."""
    if tcfg.role not in PRESETS:
        raise ConfigError(f"trainer.role {tcfg.role!r}: must be one of {', '.join(ROLES)}")
    keep = set(explicit)
    changes = {k: v for k, v in PRESETS[tcfg.role].items()
               if k not in keep and getattr(tcfg, k) == getattr(_DEFAULTS, k)}
    return msgspec.structs.replace(tcfg, **changes) if changes else tcfg


def serves(tcfg: TrainerConfig, domain: str) -> bool:
    """Whether a trainer of ``tcfg`` trains examples of ``domain`` (a VM: its ``vm_domains``, empty = all)."""
    return tcfg.role != "vm" or not tcfg.vm_domains or domain in tcfg.vm_domains
