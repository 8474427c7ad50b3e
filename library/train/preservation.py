"""Output preservation without regularization images (`preservation_weight`, docs/TRAINING.md).

Each step also asks the base model (the LoRA at multiplier 0, no gradient) what it predicts
for the same noisy latents and timesteps under a *class prompt*, and adds

    preservation_weight * mean_b( w(t_b) * loss(pred_LoRA(x_t, class_b), pred_base(x_t, class_b)) )

to the loss: the LoRA is pulled back to the base model's behaviour wherever the prompt does
not name the trigger, without pictures to collect (ai-toolkit's "differential output
preservation", `diff_output_preservation`; OneTrainer trains on the base model's prediction
in a "prior prediction" concept). `loss` and `w(t)` are the run's loss_type and timestep
weights (min-SNR, debiased, ...); prior_loss_weight and alpha masks do not enter.

The class prompt of a sample is its caption with the trigger word replaced by the class
(ai-toolkit's `diff_output_preservation_class`): the folder `10_zorblat toy` gives the
trigger "zorblat" and the class "toy", so "zorblat, a purple star" becomes "toy, a purple
star". `preservation_trigger` / `preservation_class` set them, and `preservation_prompt`
uses one fixed prompt instead. A caption without the trigger (a regularization image) is
its own class prompt.

Cost: one extra UNet forward without gradient (the base prediction) per step, and the LoRA's
forward and backward run on a batch twice as large (captions and class prompts together):
one backward, not two.
"""
from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from typing import Iterator

import torch

_REPEAT_DIR = re.compile(r"^\d+_(.*)$")
log = logging.getLogger("tomlora")


@dataclass(frozen=True)
class ClassPrompts:
    """Maps captions to their preservation prompts."""
    trigger: str | None = None
    klass: str = ""
    prompt: str | None = None

    def __call__(self, captions: list[str]) -> list[str]:
        if self.prompt is not None:
            return [self.prompt] * len(captions)
        return [replace_trigger(c, self.trigger, self.klass) for c in captions]


def replace_trigger(caption: str, trigger: str, klass: str) -> str:
    """`caption` with each whole-word `trigger` replaced by `klass`; with an empty class the
    commas and spaces it leaves behind are tidied."""
    out = re.sub(rf"(?<!\w){re.escape(trigger)}(?!\w)", klass, caption)
    if not klass:
        out = re.sub(r"\s*,\s*(,\s*)+", ", ", out)
        out = re.sub(r"\s+,", ",", out)
        out = re.sub(r"\s{2,}", " ", out).strip(" ,")
    return out


def class_prompts(training_cfg, items) -> ClassPrompts | None:
    """The preservation prompts of a run (None when `preservation_weight` is 0); ValueError
    naming the keys to set when the trigger and class cannot be read from the folders."""
    tr = training_cfg
    if not tr.preservation_weight:
        return None
    if tr.preservation_prompt is not None:
        return ClassPrompts(prompt=tr.preservation_prompt)
    trigger, klass = tr.preservation_trigger, tr.preservation_class
    if trigger is None or klass is None:
        names = sorted({m.group(1).strip() for i in items if not i.is_reg
                        for m in [_REPEAT_DIR.match(i.folder)] if m})
        words = names[0].split(None, 1) if len(names) == 1 else []
        if not words:
            found = ", ".join(repr(n) for n in names) or "none in the N_name form"
            raise ValueError(
                f"preservation_weight: the trigger word and class cannot be read from the "
                f"training folder names ({found}; the form is \"10_trigger class\"); set "
                "preservation_trigger and preservation_class, or preservation_prompt")
        trigger = words[0] if trigger is None else trigger
        klass = (words[1] if len(words) > 1 else "") if klass is None else klass
    if not trigger.strip():
        raise ValueError("preservation_trigger: empty; set the trigger word of the captions")
    return ClassPrompts(trigger=trigger, klass=klass)


@contextlib.contextmanager
def lora_off(network) -> Iterator[None]:
    """Every LoRA module at multiplier 0 (its forward is the base module's) inside."""
    saved = [(m, m.multiplier) for m in network]
    for m, _ in saved:
        m.multiplier = 0.0
    try:
        yield
    finally:
        for m, multiplier in saved:
            m.multiplier = multiplier


class Preservation:
    """What the step needs: the prompts, the weight, the network (to switch off) and the
    text conditioning (to encode the class prompts)."""

    def __init__(self, prompts: ClassPrompts, weight: float, network, conditioning):
        self.prompts, self.weight = prompts, weight
        self.network, self.conditioning = network, conditioning

    def class_cond(self, captions: list[str]) -> tuple[dict, dict]:
        """(conditioning for the LoRA branch, with gradient when the text encoder trains;
        the base model's conditioning, without)."""
        texts = self.prompts(captions)
        with torch.no_grad(), lora_off(self.network):
            base = self.conditioning(texts)
        with torch.set_grad_enabled(self.conditioning.train_te):
            mine = self.conditioning(texts)
        return mine, base

    def base_prediction(self, call, noisy, t, cond: dict, extra: dict) -> torch.Tensor:
        """The base model's prediction: the same UNet call with the LoRA off, no gradient."""
        with torch.no_grad(), lora_off(self.network):
            return call(noisy, t, cond, extra).detach()


def make_preservation(prompts: ClassPrompts | None, training_cfg, network, conditioning
                      ) -> Preservation | None:
    if prompts is None:
        return None
    what = f"the prompt {prompts.prompt!r}" if prompts.prompt is not None else \
        f"each caption with {prompts.trigger!r} replaced by {prompts.klass!r}"
    log.info(f"output preservation (weight {training_cfg.preservation_weight}): the base "
             f"model's prediction for {what}")
    return Preservation(prompts, training_cfg.preservation_weight, network, conditioning)


def doubled(batch: dict, keep: frozenset) -> dict:
    """The batch with each tensor (except those in `keep`) stacked twice along dim 0."""
    return {k: torch.cat([v, v]) if isinstance(v, torch.Tensor) and k not in keep else v
            for k, v in batch.items()}


def joined(a: dict, b: dict) -> dict:
    """Two conditioning dicts concatenated along the batch (None entries stay None)."""
    return {k: torch.cat([v, b[k].to(v.dtype)]) if isinstance(v, torch.Tensor) else v
            for k, v in a.items()}
