"""A LoRA from the difference of a tuned and a base model (sd-scripts'
extract_lora_from_models.py, module by module).

Targets are kohya's defaults, chosen from the models' tensor names: every Linear / 1x1 conv of
the UNet's transformer blocks (attention, proj_in/out, feed-forward) and the six projections of
every text-encoder layer; with `conv_dim` also the ResNet convs, time projections and
down/up-samplers (LoCon). Each module's delta W_tuned - W_base (fp32) is factored by SVD to
`dim` (3x3 convs: `conv_dim`), alpha = rank, both factors clamped at the `clamp_quantile` of
their values. The text encoders are extracted only if some weight differs by more than
`min_diff`, as in sd-scripts (a fine-tune that froze them would otherwise add noise).
"""
from __future__ import annotations

import re

import torch

from library.lora_tools import cli
from library.lora_tools.model_files import BaseModel
from library.lora_tools.svd import low_rank

_ATTENTION = re.compile(r"^unet\.(?:(?:down|up)_blocks\.\d+|mid_block)\.attentions\.\d+\.")
_CONV = re.compile(r"^unet\.(?:(?:down|up)_blocks\.\d+|mid_block)\."
                   r"(?:resnets\.\d+\.(?:conv1|conv2|conv_shortcut|time_emb_proj)"
                   r"|(?:down|up)samplers\.0\.conv)$")


def targets(model: BaseModel, conv: bool) -> list[str]:
    out = []
    for stem, slots in model.slots.items():
        path = slots[0].path
        if path.startswith("text_encoder") or _ATTENTION.match(path) or \
                (conv and _CONV.match(path)):
            out.append(stem)
    return sorted(out)


def check_pair(base: BaseModel, tuned: BaseModel) -> None:
    if base.family != tuned.family:
        raise ValueError(f"--model_org {base.root} is {base.family} but --model_tuned "
                         f"{tuned.root} is {tuned.family}")
    for stem, slots in base.slots.items():
        other = tuned.slots.get(stem)
        if other is None or tuple(other[0].shape) != tuple(slots[0].shape):
            have = list(other[0].shape) if other else "nothing"
            raise ValueError(f"module {stem}: --model_org {base.root} has "
                             f"{list(slots[0].shape)} but --model_tuned {tuned.root} has "
                             f"{have} (not the same architecture)")


def diff(base: BaseModel, tuned: BaseModel, stem: str, device: str = "cpu") -> torch.Tensor:
    a, b = base.slots[stem][0], tuned.slots[stem][0]
    w_t = tuned.read(b).to(device=device, dtype=torch.float32)
    return w_t.sub_(base.read(a).to(device=device, dtype=torch.float32)).reshape(a.shape)


def text_encoders_differ(base, tuned, stems: list[str], min_diff: float, quiet: bool
                         ) -> tuple[bool, float]:
    """(any |diff| > min_diff, the largest |diff|) over the text-encoder targets."""
    largest = 0.0
    te = [s for s in stems if not s.startswith("lora_unet_")]
    for stem in cli.progress(te, "compare text encoders", len(te), quiet):
        largest = max(largest, float(diff(base, tuned, stem).abs().max()))
        if largest > min_diff:
            return True, largest
    return False, largest


def extract(base: BaseModel, tuned: BaseModel, stems: list[str], dim: int,
            conv_dim: int | None, *, clamp_quantile: float | None, device: str,
            quiet: bool = False) -> tuple[dict, dict[str, float]]:
    """({stem: (up, down, alpha)}, {stem: retained Frobenius fraction})."""
    factors, kept = {}, {}
    for stem in cli.progress(stems, "extract", len(stems), quiet):
        d = diff(base, tuned, stem, device)
        conv3x3 = d.dim() == 4 and tuple(d.shape[2:]) != (1, 1)
        rank = conv_dim if conv3x3 and conv_dim else dim
        f = low_rank(d, rank, clamp_quantile=clamp_quantile, device=device)
        factors[stem] = (f.up, f.down, float(f.rank))
        kept[stem] = f.fro_retained
        del d
    return factors, kept
