"""Full / diff (LyCORIS's `full`): the whole weight difference is trained, ΔW = diff (and
Δbias = diff_b when the base has a bias). No rank, no alpha; the file is as large as the
layers it covers (a fine-tune stored as a difference).

Tensors (LyCORIS's names): `diff` [out, in(, kh, kw)], `diff_b` [out]. Zero-initialised.
"""
from __future__ import annotations

import torch
from torch import nn

from networks.adapters.base import Adapter


def delta_from_tensors(t: dict, shape: tuple) -> torch.Tensor:
    return t["diff"].float().reshape(shape)


class FullModule(Adapter):
    algo = "full"

    def _build(self, rank: int, alpha: float | None) -> None:
        base = self.base
        self.diff = nn.Parameter(torch.zeros(self.weight_shape, dtype=torch.float32))
        self.diff_b = nn.Parameter(torch.zeros(base.bias.shape, dtype=torch.float32)) \
            if base.bias is not None else None

    def slots(self) -> dict[str, torch.Tensor]:
        out = {"diff": self.diff}
        if self.diff_b is not None:
            out["diff_b"] = self.diff_b
        return out

    def _delta(self) -> torch.Tensor:
        return self.diff.float()

    def _delta_bias(self) -> torch.Tensor | None:
        return self.diff_b
