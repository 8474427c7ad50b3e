"""Learning-rate schedules as one pure function of the step, plus the torch wrapper.

`lr_factor` is the multiplier of each param group's learning rate at an optimizer step; the
formulas are those of diffusers' / transformers' `get_scheduler` (which kohya uses), so a
kohya config gives the same curve. Two optimizers override the configured schedule, as in
kohya: Adafactor with `relative_step` computes its own step size (the "adafactor" schedule
only reports it), and schedule-free optimizers run at a constant rate.

As in sd-scripts' `get_scheduler_fix`, `lr_scheduler_type` names any scheduler class (a
class path, or a bare name in `torch.optim.lr_scheduler`), built with (optimizer,
**lr_scheduler_args); without it, `lr_scheduler_args` reach the built-in schedule where its
diffusers function takes them (SCHEDULE_ARGS).
"""
from __future__ import annotations

import logging
import math

from library.train.class_path import import_class, keyword_problems, literal

log = logging.getLogger("tomlora")

SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
             "polynomial", "cosine_with_min_lr", "adafactor")


def warmup_steps(lr_warmup_steps: float, total_steps: int) -> int:
    """A value below 1 is a fraction of the total steps (rounded down, as kohya does);
    otherwise a step count."""
    if 0 < lr_warmup_steps < 1:
        return int(lr_warmup_steps * total_steps)
    return int(lr_warmup_steps)


# lr_scheduler_args a built-in schedule takes: the keywords of its diffusers function that
# no other key sets (num_cycles of cosine_with_restarts is lr_scheduler_num_cycles, power is
# lr_scheduler_power); `last_epoch` is left out: resume restores the schedule exactly.
SCHEDULE_ARGS = {"cosine": ("num_cycles",), "polynomial": ("lr_end",)}


def lr_factor(name: str, step: int, *, total: int, warmup: int = 0, num_cycles: int = 1,
              power: float = 1.0, min_lr_ratio: float = 0.0, cosine_cycles: float = 0.5,
              end_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate for the optimizer step `step` (0-based).

    Every schedule but "constant" without warmup ramps linearly from 0 over `warmup` steps;
    "constant" with warmup means warmup, then constant (kohya accepts it).
    `cosine_cycles` (lr_scheduler_args num_cycles) is the number of cosine waves of
    "cosine" (0.5: one half wave, 1 -> 0); `end_ratio` (lr_scheduler_args lr_end over the
    learning rate) is where "polynomial" ends.
    """
    if name not in SCHEDULES or name == "adafactor":
        raise ValueError(f"lr_scheduler {name!r} has no closed form; valid: "
                         f"{', '.join(SCHEDULES[:-1])}")
    if step < warmup:
        return step / max(1, warmup)
    if name in ("constant", "constant_with_warmup"):
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if name == "linear":
        return max(0.0, 1.0 - progress)
    if name == "cosine":  # half a cosine wave by default: 1 -> 0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * cosine_cycles * 2.0 * progress)))
    if name == "cosine_with_restarts":  # num_cycles hard restarts back to 1
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0))))
    if name == "polynomial":  # (1 - progress)^power, down to end_ratio (diffusers: 1e-7 absolute)
        return (1.0 - end_ratio) * max(0.0, 1.0 - progress) ** power + end_ratio
    # cosine_with_min_lr: the cosine, lifted so it ends at min_lr_ratio (transformers)
    cos = max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))
    return cos * (1.0 - min_lr_ratio) + min_lr_ratio


def effective_schedule(opt_cfg) -> tuple[str, list[str]]:
    """(schedule actually used, warnings) for the optimizer section of the config."""
    from library.train.optimizers import resolve, uses_relative_step
    name, notes = opt_cfg.lr_scheduler, []
    spec = resolve(opt_cfg.optimizer_type)
    if opt_cfg.lr_scheduler_type and not spec.schedule_free:  # sd-scripts: before adafactor
        return "custom", notes
    if opt_cfg.lr_scheduler_args and (spec.schedule_free or name == "adafactor"):
        notes.append("lr_scheduler_args are ignored: the "
                     f"{spec.name if spec.schedule_free else 'adafactor'} schedule takes none")
    if uses_relative_step(opt_cfg.optimizer_type, opt_cfg.optimizer_args):
        if name != "adafactor":
            notes.append(f"Adafactor with relative_step computes its own learning rate: "
                         f"lr_scheduler = \"{name}\" is replaced by the adafactor schedule")
        if opt_cfg.lr_warmup_steps:
            notes.append("lr_warmup_steps is ignored with Adafactor's relative_step "
                         "(use optimizer_args warmup_init = true)")
        return "adafactor", notes
    if spec.schedule_free:
        if name != "constant" or opt_cfg.lr_warmup_steps or opt_cfg.lr_scheduler_type:
            notes.append(f"{spec.name} needs no schedule: lr_scheduler, lr_scheduler_type "
                         "and lr_warmup_steps are ignored (use optimizer_args warmup_steps = N)")
        return "constant", notes
    return name, notes


def make_scheduler(name: str, optimizer, *, total_steps: int, warmup: int, num_cycles: int = 1,
                   power: float = 1.0, min_lr_ratio: float = 0.0, initial_lr: float = 0.0,
                   cosine_cycles: float = 0.5, end_ratio: float = 0.0):
    """A torch LR scheduler stepping `lr_factor`; "adafactor" wraps transformers'
    AdafactorSchedule, which reports the step size Adafactor computed (initial_lr before
    the first step)."""
    if name == "adafactor":
        from transformers.optimization import Adafactor, AdafactorSchedule
        inner = getattr(optimizer, "optimizer", optimizer)
        if not isinstance(inner, Adafactor):
            raise ValueError("lr_scheduler = \"adafactor\" needs optimizer_type = "
                             "\"Adafactor\" with relative_step")
        return AdafactorSchedule(inner, initial_lr)
    from torch.optim.lr_scheduler import LambdaLR
    lr_factor(name, 0, total=total_steps, warmup=warmup)  # unknown names fail here, early

    def factor(step: int) -> float:
        return lr_factor(name, step, total=total_steps, warmup=warmup, num_cycles=num_cycles,
                         power=power, min_lr_ratio=min_lr_ratio, cosine_cycles=cosine_cycles,
                         end_ratio=end_ratio)
    return LambdaLR(optimizer, factor)


def scheduler_from_config(opt_cfg, optimizer, total_steps: int):
    """The run's LR scheduler from the [optimizer] section (warnings are logged)."""
    name, notes = effective_schedule(opt_cfg)
    for note in notes:
        log.warning(note)
    args = {k: literal(v) for k, v in opt_cfg.lr_scheduler_args.items()}
    if name == "custom":
        cls = import_class(opt_cfg.lr_scheduler_type, "torch.optim.lr_scheduler",
                           "lr_scheduler_type")
        log.info(f"lr_scheduler_type {opt_cfg.lr_scheduler_type}: imported {cls.__module__}."
                 f"{cls.__qualname__}, called with {args or 'no lr_scheduler_args'}")
        return cls(optimizer, **args)
    return make_scheduler(name, optimizer, total_steps=total_steps,
                          warmup=warmup_steps(opt_cfg.lr_warmup_steps, total_steps),
                          num_cycles=opt_cfg.lr_scheduler_num_cycles,
                          power=opt_cfg.lr_scheduler_power,
                          min_lr_ratio=opt_cfg.lr_scheduler_min_lr_ratio or 0.0,
                          initial_lr=opt_cfg.learning_rate,
                          cosine_cycles=float(args.get("num_cycles", 0.5)) if name ==
                          "cosine" else 0.5,
                          end_ratio=float(args.get("lr_end", 0.0)) / opt_cfg.learning_rate
                          if name == "polynomial" else 0.0)


def scheduler_problems(opt_cfg) -> list[tuple[str, str]]:
    """Config-time check of lr_scheduler_type / lr_scheduler_args: (key, message) pairs.
    A class path is imported here, so one that does not import stops the run early."""
    args = {k: literal(v) for k, v in opt_cfg.lr_scheduler_args.items()}
    if opt_cfg.lr_scheduler_type:
        try:
            cls = import_class(opt_cfg.lr_scheduler_type, "torch.optim.lr_scheduler",
                               "lr_scheduler_type")
        except ValueError as e:
            return [("lr_scheduler_type", str(e).removeprefix("lr_scheduler_type "))]
        out = [("lr_scheduler_args", m.removeprefix("lr_scheduler_args: "))
               for m in keyword_problems(cls, args, "lr_scheduler_args", ("optimizer",))]
        if opt_cfg.lr_warmup_steps:
            out.append(("lr_warmup_steps", f"a custom lr_scheduler_type takes no warmup "
                        "(as in sd-scripts); remove lr_warmup_steps or use the class's own "
                        "arguments"))
        return out
    name, accepted, out = opt_cfg.lr_scheduler, SCHEDULE_ARGS.get(opt_cfg.lr_scheduler, ()), []
    if name == "adafactor":
        return out  # sd-scripts passes no arguments to it (effective_schedule warns)
    for key, value in args.items():
        if key not in accepted:
            hint = ("resume restores the schedule" if key == "last_epoch" else
                    f"accepted: {', '.join(accepted) or 'none'}")
            out.append(("lr_scheduler_args", f"{key!r} is not an argument of the {name} "
                        f"schedule; {hint}"))
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            out.append(("lr_scheduler_args", f"{key} = {value!r}: expected a number >= 0"))
        elif key == "lr_end" and value >= opt_cfg.learning_rate:
            out.append(("lr_scheduler_args", f"lr_end = {value!r} must be below "
                        f"learning_rate ({opt_cfg.learning_rate:g})"))
    return out
