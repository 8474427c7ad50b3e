"""The closed optimizer registry: a name from the config -> a constructor, never a dotted path.

Names are kohya's (matched case-insensitively, with kohya's aliases). Each entry lists the
`optimizer_args` it accepts and their types, so a typo or a wrong type is a config error that
names the accepted arguments, before any model loads. Optional packages (prodigyopt,
dadaptation, schedulefree, came-pytorch) are imported only when their optimizer is chosen;
a missing one is reported with the pip command that installs it.

This module imports neither torch nor the optimizer packages at import time, so the config
schema can take its choices from here cheaply.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
from dataclasses import dataclass, field
from typing import Callable

from library.train.optimizer_args import flag, integer, number, numbers, optional_number, \
    type_args

log = logging.getLogger("tomlora")


@dataclass(frozen=True)
class OptimizerSpec:
    name: str                                   # kohya's spelling, used in messages and metadata
    build: Callable                             # (param_groups, lr, typed args) -> optimizer
    args: dict[str, Callable]                   # accepted optimizer_args -> converter
    module: str                                 # import name of the package that provides it
    pip: str                                    # what to pip install when it is missing
    aliases: tuple[str, ...] = ()
    adaptive: bool = False                      # learning_rate multiplies an estimated step (D-Adaptation, Prodigy)
    schedule_free: bool = False                 # has its own schedule; needs train()/eval() calls
    defaults: dict = field(default_factory=dict)  # kohya defaults that differ from the class's


def _class(module: str, name: str):
    return getattr(importlib.import_module(module), name)


def _plain(module: str, cls: str):
    def build(groups, lr, args):
        return _class(module, cls)(groups, lr=lr, **args)
    return build


def _adamw(groups, lr, args):
    import torch
    if "fused" not in args and "foreach" not in args and \
            all(p.is_cuda for g in groups for p in g["params"]):
        args = {**args, "fused": True}  # one kernel for all LoRA params on CUDA
    return torch.optim.AdamW(groups, lr=lr, **args)


def _sgd_nesterov(groups, lr, args):
    import torch
    return torch.optim.SGD(groups, lr=lr, nesterov=True, **args)


def _adafactor(groups, lr, args):
    from transformers.optimization import Adafactor
    if args.get("warmup_init") and not args.get("relative_step", True):
        log.warning("Adafactor: warmup_init = true needs relative_step; setting "
                    "relative_step = true (as kohya does)")
        args = {**args, "relative_step": True}
    if args.get("relative_step", True):
        # Adafactor then computes its own step size from the step count; a given lr is an
        # error in transformers. kohya drops the per-group lrs the same way.
        if len({g.get("lr", lr) for g in groups}) > 1:
            log.warning("Adafactor with relative_step: unet_lr / text_encoder_lr are ignored")
        groups = [{k: v for k, v in g.items() if k != "lr"} for g in groups]
        return Adafactor(groups, lr=None, **args)
    return Adafactor(groups, lr=lr, **args)


def _schedule_free(module: str, cls: str):
    def build(groups, lr, args):
        opt = _class(module, cls)(groups, lr=lr, **args)
        opt.train()  # schedule-free optimizers refuse to step in eval mode
        return opt
    return build


_ADAM = {"betas": numbers(2), "eps": number, "weight_decay": number}
_BNB = "bitsandbytes"
_SPECS = [
    OptimizerSpec("AdamW", _adamw, {**_ADAM, "amsgrad": flag, "fused": flag, "foreach": flag,
                                    "maximize": flag}, "torch", "torch"),
    OptimizerSpec("AdamW8bit", _plain(f"{_BNB}.optim", "AdamW8bit"),
                  {**_ADAM, "amsgrad": flag, "min_8bit_size": integer}, _BNB, _BNB),
    OptimizerSpec("PagedAdamW8bit", _plain(f"{_BNB}.optim", "PagedAdamW8bit"),
                  {**_ADAM, "amsgrad": flag, "min_8bit_size": integer}, _BNB, _BNB),
    OptimizerSpec("Lion8bit", _plain(f"{_BNB}.optim", "Lion8bit"),
                  {"betas": numbers(2), "weight_decay": number, "min_8bit_size": integer},
                  _BNB, _BNB),
    # 32-bit Lion from bitsandbytes (kohya imports lion-pytorch; same update rule).
    OptimizerSpec("Lion", _plain(f"{_BNB}.optim", "Lion"),
                  {"betas": numbers(2), "weight_decay": number}, _BNB, _BNB),
    OptimizerSpec("SGDNesterov", _sgd_nesterov, {"momentum": number, "weight_decay": number,
                                                 "maximize": flag, "foreach": flag},
                  "torch", "torch", defaults={"momentum": 0.9}),
    OptimizerSpec("Adafactor", _adafactor,
                  {"eps": numbers(2), "clip_threshold": number, "decay_rate": number,
                   "beta1": optional_number, "weight_decay": number, "scale_parameter": flag,
                   "relative_step": flag, "warmup_init": flag}, "transformers", "transformers"),
    OptimizerSpec("Prodigy", _plain("prodigyopt", "Prodigy"),
                  {**_ADAM, "beta3": optional_number, "decouple": flag,
                   "use_bias_correction": flag, "safeguard_warmup": flag, "d0": number,
                   "d_coef": number, "growth_rate": number, "fsdp_in_use": flag,
                   "slice_p": integer}, "prodigyopt", "prodigyopt", adaptive=True),
    # kohya maps "DAdaptation" to the preprint variant; we map it to the released DAdaptAdam.
    OptimizerSpec("DAdaptAdam", _plain("dadaptation", "DAdaptAdam"),
                  {**_ADAM, "log_every": integer, "decouple": flag,
                   "use_bias_correction": flag, "d0": number, "growth_rate": number,
                   "fsdp_in_use": flag}, "dadaptation", "dadaptation",
                  aliases=("DAdaptation",), adaptive=True),
    OptimizerSpec("AdamWScheduleFree", _schedule_free("schedulefree", "AdamWScheduleFree"),
                  {**_ADAM, "warmup_steps": integer, "r": number, "weight_lr_power": number,
                   "foreach": flag}, "schedulefree", "schedulefree", schedule_free=True),
    OptimizerSpec("CAME", _plain("came_pytorch", "CAME"),
                  {"betas": numbers(3), "eps": numbers(2), "clip_threshold": number,
                   "weight_decay": number}, "came_pytorch", "came-pytorch"),
]
OPTIMIZERS: dict[str, OptimizerSpec] = {s.name: s for s in _SPECS}
_BY_LOWER = {n.lower(): s for s in _SPECS for n in (s.name, *s.aliases)}
# Every accepted spelling, for the schema's choices.
OPTIMIZER_NAMES: tuple[str, ...] = tuple(n for s in _SPECS for n in (s.name, *s.aliases))


def resolve(name: str) -> OptimizerSpec:
    spec = _BY_LOWER.get(str(name).lower())
    if spec is None:
        raise ValueError(f"optimizer_type {name!r} is unknown; valid: "
                         f"{', '.join(OPTIMIZER_NAMES)}")
    return spec


def install_hint(spec: OptimizerSpec) -> str | None:
    """A message with the pip command when the optimizer's package is missing, else None."""
    if importlib.util.find_spec(spec.module) is not None:
        return None
    return (f"optimizer_type = \"{spec.name}\" needs the package {spec.pip}, which is not "
            f"installed: pip install {spec.pip}")


def _check(spec: OptimizerSpec, args: dict) -> tuple[dict, list[str]]:
    typed, problems = type_args(spec.name, args, spec.args)
    return {**spec.defaults, **typed}, problems


def typed_args(name: str, args: dict) -> dict:
    """The optimizer's defaults overlaid with the typed `optimizer_args`; ValueError lists
    every problem."""
    typed, problems = _check(resolve(name), args)
    if problems:
        raise ValueError("; ".join(problems))
    return typed


def optimizer_problems(name: str, args: dict) -> list[str]:
    """Config-time check of optimizer_type and optimizer_args (no optimizer is built)."""
    try:
        spec = resolve(name)
    except ValueError as e:
        return [str(e)]
    _, problems = _check(spec, args)
    hint = install_hint(spec)
    return problems + ([hint] if hint else [])


def uses_relative_step(name: str, args: dict) -> bool:
    """Adafactor computes its own step size (kohya's default for Adafactor)."""
    spec = resolve(name)
    if spec.name != "Adafactor":
        return False
    typed = typed_args(name, args)
    return typed.get("relative_step", True) or typed.get("warmup_init", False)


def make_optimizer(name: str, groups: list[dict], lr: float, args: dict):
    spec = resolve(name)
    hint = install_hint(spec)
    if hint:
        raise RuntimeError(hint)
    typed = typed_args(name, args)
    if spec.adaptive and lr < 0.1:
        log.warning(f"{spec.name} adapts the step size; learning_rate is a multiplier and "
                    f"is usually 1.0 (got {lr:g})")
    try:
        return spec.build(groups, lr, typed)
    except TypeError as e:  # an argument the installed package version does not know
        raise ValueError(f"optimizer_args {typed!r} do not fit {spec.name}: {e}") from None


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer


@contextlib.contextmanager
def eval_weights(optimizer):
    """Schedule-free optimizers keep training and evaluation weights apart: inside this block
    the model holds the evaluation weights (for sampling, validation and saving). A no-op for
    every other optimizer."""
    opt = _inner(optimizer)
    switch = callable(getattr(opt, "eval", None)) and callable(getattr(opt, "train", None))
    if switch:
        opt.eval()
    try:
        yield
    finally:
        if switch:
            opt.train()

