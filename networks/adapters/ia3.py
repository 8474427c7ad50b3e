"""(IA)³ (Liu et al. 2022; LyCORIS's `ia3`): a learned per-channel rescaling of the weight,
W' = W · (1 + w), on the output rows or, with `train_on_input`, the input columns; so
ΔW = W · w. The smallest files of the family (one vector per layer); the bias is untouched.

Tensors (LyCORIS's names): `weight` ([out] or [in] for Linear, [1, C, 1, 1] for a conv) and
`on_input` (0 or 1). Zero-initialised. ΔW depends on the base weight, so converting a file
to LoRA needs the base model.
"""
from __future__ import annotations

import torch
from torch import nn

from networks.adapters.base import Adapter


def ia3_delta(base_weight: torch.Tensor, w: torch.Tensor, on_input: bool) -> torch.Tensor:
    """W · w along the input (on_input) or output channel axis, in fp32."""
    base_weight, w = base_weight.float(), w.float().reshape(-1)
    view = [1] * base_weight.dim()
    view[1 if on_input else 0] = -1
    return base_weight * w.view(view)


def delta_from_tensors(t: dict, shape: tuple, base_weight: torch.Tensor | None = None
                       ) -> torch.Tensor:
    if base_weight is None:
        raise ValueError("(IA)3: ΔW = W · w needs the base model's weight")
    on_input = bool(int(t["on_input"].float().item())) if "on_input" in t else False
    return ia3_delta(base_weight, t["weight"], on_input).reshape(shape)


class IA3Module(Adapter):
    algo = "ia3"

    def _build(self, rank: int, alpha: float | None) -> None:
        out_dim, in_dim, *k = self.weight_shape
        if self.is_conv:
            # LyCORIS keeps the full in_channels here (not per group)
            in_dim = self.base.in_channels
        dim = in_dim if self.spec.on_input else out_dim
        shape = (1, dim, *[1] * len(k)) if self.is_conv else (dim,)
        self.weight = nn.Parameter(torch.zeros(shape, dtype=torch.float32))
        self.register_buffer("on_input", torch.tensor(int(self.spec.on_input)))

    def slots(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "on_input": self.on_input}

    def _delta(self) -> torch.Tensor:
        # the spec's bool, not the buffer: reading a tensor on the host in the forward would
        # sync the GPU and break CUDA graph capture (the buffer is built from the same bool)
        return ia3_delta(self.original_weight(), self.weight, self.spec.on_input)
