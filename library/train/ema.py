"""Exponential moving average (EMA) of the LoRA weights (`ema_decay`, docs/TRAINING.md).

After each optimizer step k (1, 2, ...) every trained LoRA tensor p updates its average

    ema <- d_k * ema + (1 - d_k) * p,    d_k = min(ema_decay, (1 + (k - 1)) / (10 + (k - 1)))

the warm-up of diffusers' EMAModel without `use_ema_warmup` (first step 0.1, 0.5 at step 9,
0.9 at step 82, 0.99 at step 892): early steps follow the weights closely, so the average
is not dragged back to the zero-initialised start. The average starts from the network's
weights when training starts (after `network_weights` are loaded).

The averages live in fp32 on the weights' device, or on the CPU with `ema_cpu` (saves GPU
memory; each update then copies the weights to the host). They are part of the training
state (`state_tensors` / `load_state_tensors`, exact resume), and `applied()` swaps them
into the network for sampling, the validation loss and the saved LoRA files.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch

log = logging.getLogger("tomlora")

STATE_PREFIX = "ema."


def ema_decay_at(decay: float, step: int) -> float:
    """The decay used by the update after optimizer step `step` (1-based)."""
    k = step - 1
    return min(decay, (1 + k) / (10 + k))


class LoraEMA:
    def __init__(self, network: torch.nn.Module, decay: float, cpu: bool = False):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be between 0 and 1 (exclusive), got {decay}")
        self.decay = decay
        self.named = [(n, p) for n, p in network.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.named]
        with torch.no_grad():
            self.shadow = [p.detach().to("cpu" if cpu else p.device, torch.float32,
                                         copy=True) for p in self.params]
        self.cpu = cpu

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the current weights in, after optimizer step `step` (1-based)."""
        weight = 1.0 - ema_decay_at(self.decay, step)
        current = [p.detach().to(s.device, torch.float32) for p, s in
                   zip(self.params, self.shadow)]
        torch._foreach_lerp_(self.shadow, current, weight)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The averages by parameter name (`ema.<name>`): the live tensors, so loading into
        them restores the EMA in place."""
        return {STATE_PREFIX + n: s for (n, _), s in zip(self.named, self.shadow)}

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, torch.Tensor], source: str = "state"
                           ) -> None:
        mine = self.state_tensors()
        missing = [k for k in mine if k not in tensors]
        if missing:  # a state saved without EMA: start the average from the resumed weights
            log.warning(f"{source}: no EMA of the LoRA weights saved ({len(missing)} tensors "
                        "missing); the EMA starts from the resumed weights")
            for s, p in zip(self.shadow, self.params):
                s.copy_(p.detach())
            return
        for k, s in mine.items():
            if tensors[k].shape != s.shape:
                raise ValueError(f"{source}: {k} has shape {tuple(tensors[k].shape)}, the "
                                 f"network's {tuple(s.shape)}")
            s.copy_(tensors[k])

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The network holds the averages inside the block; its own weights come back
        after, bit for bit."""
        backup = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)


class NoEMA:
    """`ema_decay` unset: the same interface, doing nothing."""

    def update(self, step: int) -> None:
        pass

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors, source: str = "state") -> None:
        pass

    def applied(self):
        return contextlib.nullcontext()


def make_ema(training_cfg, network, resume: str | None = None) -> LoraEMA | NoEMA:
    """The run's EMA (NoEMA without `ema_decay`); made after a resume has loaded the
    network's weights, and restored from that state folder's extra tensors."""
    if not training_cfg.ema_decay:
        return NoEMA()
    ema = LoraEMA(network, training_cfg.ema_decay, cpu=training_cfg.ema_cpu)
    if resume:
        from library.train.state import read_extra_tensors
        ema.load_state_tensors(read_extra_tensors(resume), source=f"resume: {resume}")
    return ema
