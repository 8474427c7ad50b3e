"""Learning-rate schedules (through diffusers' `get_scheduler`) and their pure warmup rule."""
from __future__ import annotations


def warmup_steps(lr_warmup_steps: float, total_steps: int) -> int:
    """A value below 1 is a fraction of the total steps; otherwise a step count."""
    if 0 < lr_warmup_steps < 1:
        return int(round(lr_warmup_steps * total_steps))
    return int(lr_warmup_steps)


def make_scheduler(name: str, optimizer, *, total_steps: int, warmup: int, num_cycles: int = 1,
                   power: float = 1.0):
    from diffusers.optimization import get_scheduler
    # kohya accepts warmup with "constant": it means warmup, then constant.
    if name == "constant" and warmup > 0:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=warmup,
                         num_training_steps=total_steps, num_cycles=num_cycles, power=power)
