"""Max-norm regularisation of adapter updates (kohya's `scale_weight_norms`).

After each optimizer step, every adapter module's weight update ΔW (for LoRA
`up @ down * alpha / rank`, a conv's kernel flattened) whose Frobenius norm is above
`max_norm` is scaled down so that its norm is exactly `max_norm`; updates at or below it are
left untouched. The scaling is spread evenly over the factors of ΔW (each of the k factors is
multiplied by ratio ** (1/k)), so for LoRA `up` and `down` are both scaled by sqrt(ratio),
as sd-scripts does. Returns the scalars sd-scripts logs, under its TensorBoard tags.

What a module must offer (kept small so other adapter kinds can join):
  - LoRA / LoCon: `lora_up.weight`, `lora_down.weight` and `scale` (alpha / rank);
  - any other kind (LoHa, LoKr ...): a method `max_norm_factors() -> (norm, factors)`, the
    Frobenius norm of its ΔW at multiplier 1 (a 0-dim tensor) and the list of tensors whose
    product forms ΔW, each entering it linearly (LoHa: the four hada_w tensors).
The multiplier is not part of the norm: it is a use-time setting, not the learned update.
Our adapters (networks/adapters) all offer `max_norm_factors`; a DoRA module returns no
factors (its update is renormalised per row) and is not scaled.
"""
from __future__ import annotations

from typing import Iterable

import torch

# sd-scripts' TensorBoard tags (train_network.py, generate_step_logs)
KEYS_SCALED = "max_norm/keys_scaled"
MAX_KEY_NORM = "max_norm/max_key_norm"
AVERAGE_KEY_NORM = "norm/avg_key_norm"


def lora_norm_and_factors(module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """||up @ down * scale||_F without forming the product: with U = up as [out, r] and
    D = down as [r, in * kh * kw], ||U D||² = sum((UᵀU) ⊙ (D Dᵀ)), two r x r matrices, so the
    cost stays linear in the layer width (the full product would be out x in per module)."""
    custom = getattr(module, "max_norm_factors", None)
    if callable(custom):
        return custom()
    up, down = module.lora_up.weight, module.lora_down.weight
    u = up.detach().float().reshape(up.shape[0], -1)
    d = down.detach().float().reshape(down.shape[0], -1)
    squared = ((u.T @ u) * (d @ d.T)).sum().clamp(min=0)
    return squared.sqrt() * abs(float(module.scale)), [up, down]


@torch.no_grad()
def apply_max_norm(modules: Iterable, max_norm: float | None) -> dict[str, float]:
    """Scale every module whose ΔW norm exceeds `max_norm` down to it (in place); returns
    {keys_scaled, max_key_norm, avg_key_norm} (norms after scaling), or {} when `max_norm` is
    unset or 0. One host sync per call: the per-module ratios stay on the device."""
    if not max_norm:
        return {}
    norms, scaled = [], []
    for m in modules:
        norm, factors = lora_norm_and_factors(m)
        if not factors:  # DoRA: its update is not a product of factors; left alone
            continue
        # ratio < 1 only above the max; the clamp keeps a zero norm from dividing by zero
        ratio = (max_norm / norm.clamp(min=max_norm / 2)).clamp(max=1.0)
        share = ratio ** (1.0 / len(factors))
        for t in factors:
            t.mul_(share.to(t.dtype))
        norms.append(norm * ratio)
        scaled.append(ratio < 1)
    if not norms:
        return {}
    norms_t = torch.stack(norms)
    stats = torch.stack([torch.stack(scaled).sum().float(), norms_t.max(), norms_t.mean()])
    keys, top, mean = stats.tolist()
    return {KEYS_SCALED: keys, MAX_KEY_NORM: top, AVERAGE_KEY_NORM: mean}
