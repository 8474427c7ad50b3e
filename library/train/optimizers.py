"""The closed optimizer registry: a name from the config -> a constructor, never a dotted path.

Each entry takes (param_groups, lr, args) where args are the typed `optimizer_args`.
"""
from __future__ import annotations

from typing import Callable

import torch


def _adamw(groups, lr, args):
    args = dict(args)
    if "fused" not in args and all(p.is_cuda for g in groups for p in g["params"]):
        args["fused"] = True  # one kernel for all LoRA params on CUDA
    return torch.optim.AdamW(groups, lr=lr, **args)


def _bnb(name: str):
    def make(groups, lr, args):
        try:
            import bitsandbytes as bnb
        except ImportError as e:  # pragma: no cover - bitsandbytes is a requirement
            raise RuntimeError(f"optimizer_type = \"{name}\" needs bitsandbytes: "
                               "pip install bitsandbytes") from e
        return getattr(bnb.optim, name)(groups, lr=lr, **args)
    return make


OPTIMIZERS: dict[str, Callable] = {
    "AdamW": _adamw,
    "AdamW8bit": _bnb("AdamW8bit"),
}


def make_optimizer(name: str, groups: list[dict], lr: float, args: dict):
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer_type {name!r} is unknown; valid: {', '.join(OPTIMIZERS)}")
    try:
        return OPTIMIZERS[name](groups, lr, args)
    except TypeError as e:
        raise ValueError(f"optimizer_args {args!r} do not fit {name}: {e}") from None
