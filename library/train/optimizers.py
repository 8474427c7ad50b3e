"""The optimizer registry: a name from the config -> a constructor, plus sd-scripts' class paths.

Names are kohya's (matched case-insensitively, with kohya's aliases). Each entry lists the
`optimizer_args` it accepts and their types, so a typo or a wrong type is a config error that
names the accepted arguments, before any model loads. Optional packages (prodigyopt,
dadaptation, schedulefree, came-pytorch) are imported only when their optimizer is chosen;
a missing one is reported with the pip command that installs it.

A name that is not in the registry is a class path, as in sd-scripts: `pkg.module.Class` is
imported and called with the param groups, `lr=learning_rate` and `optimizer_args` as
keyword arguments; a bare name is looked up in `torch.optim` (`RAdam`, `NAdam` ...). The
import happens when the config is checked, so a path that does not import is a config error.

This module imports neither torch nor the optimizer packages at import time, so the config
schema can list the names from here cheaply.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import importlib
import importlib.util
import logging
from dataclasses import dataclass, field
from typing import Callable

from library.train.class_path import import_class, keyword_problems, literal
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
    cls: object = None                          # set for a class path: the imported class


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


def _sgd_nesterov_8bit(groups, lr, args):
    return _class("bitsandbytes.optim", "SGD8bit")(groups, lr=lr, nesterov=True, **args)


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
    # Paged: optimizer state in CUDA unified memory, paged to CPU RAM under memory pressure
    # (on a CPU the paging is a no-op and they step like their unpaged twins).
    OptimizerSpec("PagedAdamW", _plain(f"{_BNB}.optim", "PagedAdamW"),
                  {**_ADAM, "amsgrad": flag, "min_8bit_size": integer}, _BNB, _BNB),
    OptimizerSpec("PagedAdamW32bit", _plain(f"{_BNB}.optim", "PagedAdamW32bit"),
                  {**_ADAM, "amsgrad": flag, "min_8bit_size": integer}, _BNB, _BNB),
    OptimizerSpec("PagedLion8bit", _plain(f"{_BNB}.optim", "PagedLion8bit"),
                  {"betas": numbers(2), "weight_decay": number, "min_8bit_size": integer},
                  _BNB, _BNB),
    # not a kohya name (kohya has no paged 32-bit Lion); bitsandbytes' class of that name
    OptimizerSpec("PagedLion", _plain(f"{_BNB}.optim", "PagedLion"),
                  {"betas": numbers(2), "weight_decay": number, "min_8bit_size": integer},
                  _BNB, _BNB),
    OptimizerSpec("SGDNesterov", _sgd_nesterov, {"momentum": number, "weight_decay": number,
                                                 "maximize": flag, "foreach": flag},
                  "torch", "torch", defaults={"momentum": 0.9}),
    OptimizerSpec("SGDNesterov8bit", _sgd_nesterov_8bit,
                  {"momentum": number, "weight_decay": number, "dampening": number,
                   "min_8bit_size": integer}, _BNB, _BNB, defaults={"momentum": 0.9}),
    OptimizerSpec("Adafactor", _adafactor,
                  {"eps": numbers(2), "clip_threshold": number, "decay_rate": number,
                   "beta1": optional_number, "weight_decay": number, "scale_parameter": flag,
                   "relative_step": flag, "warmup_init": flag}, "transformers", "transformers"),
    OptimizerSpec("Prodigy", _plain("prodigyopt", "Prodigy"),
                  {**_ADAM, "beta3": optional_number, "decouple": flag,
                   "use_bias_correction": flag, "safeguard_warmup": flag, "d0": number,
                   "d_coef": number, "growth_rate": number, "fsdp_in_use": flag,
                   "slice_p": integer}, "prodigyopt", "prodigyopt", adaptive=True),
    OptimizerSpec("DAdaptAdam", _plain("dadaptation", "DAdaptAdam"),
                  {**_ADAM, "log_every": integer, "decouple": flag,
                   "use_bias_correction": flag, "d0": number, "growth_rate": number,
                   "fsdp_in_use": flag}, "dadaptation", "dadaptation", adaptive=True),
    # kohya's "DAdaptation" is the preprint variant, from dadaptation.experimental
    OptimizerSpec("DAdaptAdamPreprint", _plain("dadaptation.experimental", "DAdaptAdamPreprint"),
                  {**_ADAM, "log_every": integer, "decouple": flag, "d0": number,
                   "growth_rate": number, "fsdp_in_use": flag}, "dadaptation", "dadaptation",
                  aliases=("DAdaptation",), adaptive=True),
    OptimizerSpec("DAdaptAdaGrad", _plain("dadaptation", "DAdaptAdaGrad"),
                  {"momentum": number, "log_every": integer, "weight_decay": number,
                   "eps": number, "d0": number, "growth_rate": number}, "dadaptation",
                  "dadaptation", adaptive=True),
    OptimizerSpec("DAdaptAdan", _plain("dadaptation", "DAdaptAdan"),
                  {"betas": numbers(3), "eps": number, "weight_decay": number, "no_prox": flag,
                   "log_every": integer, "d0": number, "growth_rate": number}, "dadaptation",
                  "dadaptation", adaptive=True),
    OptimizerSpec("DAdaptAdanIP", _plain("dadaptation.experimental", "DAdaptAdanIP"),
                  {"betas": numbers(3), "eps": number, "weight_decay": number, "no_prox": flag,
                   "log_every": integer, "d0": number, "growth_rate": number}, "dadaptation",
                  "dadaptation", adaptive=True),
    OptimizerSpec("DAdaptLion", _plain("dadaptation", "DAdaptLion"),
                  {"betas": numbers(2), "weight_decay": number, "log_every": integer,
                   "d0": number, "fsdp_in_use": flag}, "dadaptation", "dadaptation",
                  adaptive=True),
    OptimizerSpec("DAdaptSGD", _plain("dadaptation", "DAdaptSGD"),
                  {"momentum": number, "weight_decay": number, "log_every": integer,
                   "d0": number, "growth_rate": number, "fsdp_in_use": flag}, "dadaptation",
                  "dadaptation", adaptive=True),
    OptimizerSpec("AdamWScheduleFree", _schedule_free("schedulefree", "AdamWScheduleFree"),
                  {**_ADAM, "warmup_steps": integer, "r": number, "weight_lr_power": number,
                   "foreach": flag}, "schedulefree", "schedulefree", schedule_free=True),
    OptimizerSpec("RAdamScheduleFree", _schedule_free("schedulefree", "RAdamScheduleFree"),
                  {**_ADAM, "r": number, "weight_lr_power": number, "foreach": flag,
                   "silent_sgd_phase": flag}, "schedulefree", "schedulefree",
                  schedule_free=True),
    OptimizerSpec("SGDScheduleFree", _schedule_free("schedulefree", "SGDScheduleFree"),
                  {"momentum": number, "weight_decay": number, "warmup_steps": integer,
                   "r": number, "weight_lr_power": number, "foreach": flag}, "schedulefree",
                  "schedulefree", schedule_free=True),
    OptimizerSpec("CAME", _plain("came_pytorch", "CAME"),
                  {"betas": numbers(3), "eps": numbers(2), "clip_threshold": number,
                   "weight_decay": number}, "came_pytorch", "came-pytorch"),
]
OPTIMIZERS: dict[str, OptimizerSpec] = {s.name: s for s in _SPECS}
_BY_LOWER = {n.lower(): s for s in _SPECS for n in (s.name, *s.aliases)}
# Every accepted spelling, for the schema's choices.
OPTIMIZER_NAMES: tuple[str, ...] = tuple(n for s in _SPECS for n in (s.name, *s.aliases))


def resolve(name: str) -> OptimizerSpec:
    """The registry entry for a name (any case), else the spec of the class path it names.
    ValueError (one line naming optimizer_type) when it is neither."""
    spec = _BY_LOWER.get(str(name).lower())
    if spec is not None:
        return spec
    if "." in str(name) or _in_torch_optim(str(name)):
        return _class_spec(str(name))
    close = difflib.get_close_matches(str(name).lower(), list(_BY_LOWER), n=1)
    hint = f" (did you mean {_BY_LOWER[close[0]].name}?)" if close else ""
    raise ValueError(f"optimizer_type {name!r} is unknown; expected one of: "
                     f"{', '.join(OPTIMIZER_NAMES)}{hint}, or an importable class path "
                     "such as torch.optim.RAdam")


def _in_torch_optim(name: str) -> bool:
    import torch.optim
    return name.isidentifier() and callable(getattr(torch.optim, name, None))


@functools.lru_cache(maxsize=None)
def _class_spec(path: str) -> OptimizerSpec:
    """sd-scripts' "any optimizer": the imported class, called with (param groups,
    lr=learning_rate, **optimizer_args). Schedule-free classes (kohya: the name ends in
    ScheduleFree; here also any class with train()/eval()) get the same treatment as the
    registry's."""
    cls = import_class(path, "torch.optim", "optimizer_type")
    schedule_free = path.lower().endswith("schedulefree") or (
        callable(getattr(cls, "train", None)) and callable(getattr(cls, "eval", None)))

    def build(groups, lr, args):
        opt = cls(groups, lr=lr, **args)
        if schedule_free and callable(getattr(opt, "train", None)):
            opt.train()
        return opt
    return OptimizerSpec(path, build, {}, path.split(".")[0], path.split(".")[0],
                         schedule_free=schedule_free, cls=cls)


def install_hint(spec: OptimizerSpec) -> str | None:
    """A message with the pip command when the optimizer's package is missing, else None."""
    if spec.cls is not None or importlib.util.find_spec(spec.module) is not None:
        return None  # a class path was imported already
    return (f"optimizer_type = \"{spec.name}\" needs the package {spec.pip}, which is not "
            f"installed: pip install {spec.pip}")


def _check(spec: OptimizerSpec, args: dict) -> tuple[dict, list[str]]:
    if spec.cls is not None:  # a class path: kohya's literal values, checked by signature
        typed = {k: literal(v) for k, v in args.items()}
        return typed, keyword_problems(spec.cls, typed, "optimizer_args", ("params", "lr"))
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
    shown = ", ".join(f"{k}={v!r}" for k, v in typed.items()) or "no optimizer_args"
    if spec.cls is not None:
        log.info(f"optimizer_type {name}: imported {spec.cls.__module__}."
                 f"{spec.cls.__qualname__}, called with lr={lr:g}, {shown}")
    else:
        log.info(f"optimizer: {spec.name} ({shown})")
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

