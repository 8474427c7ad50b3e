"""LoRA / LoCon (Hu et al. 2021; LyCORIS's LoCon for convs): ΔW = up · down · alpha / rank.

Tensors: `lora_down.weight` [r, in(, kh, kw)], `lora_up.weight` [out, r(, 1, 1)], `alpha`;
with `use_tucker` on a k x k conv (LyCORIS's CP/Tucker LoCon) `lora_down` is 1x1,
`lora_mid.weight` [r, r, kh, kw] carries the kernel, stride and padding, and
ΔW = mid ×₁ up ×₂ down. `dora_scale` with DoRA (base.py).

The forward keeps the fast path `up(down(x))` (no ΔW is built), with kohya's dropout and
rank dropout on the rank axis; `SharedInputDown` batches the down projections of layers that
read the same input (batch_qkv_lora). With DoRA the rebuild path of base.py is used: DoRA
needs the merged weight's norm.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from networks.adapters.base import Adapter


def lora_delta(up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor | None = None,
               scale: float = 1.0) -> torch.Tensor:
    """scale · up @ down in fp32 (conv: [out, in, kh, kw]); with a Tucker `mid`,
    ΔW[o, i, h, w] = Σ up[o, a] · mid[a, b, h, w] · down[b, i]."""
    up, down = up.float(), down.float()
    up2 = up.reshape(up.shape[0], -1)
    if mid is not None:
        delta = torch.einsum("ab...,oa,bi->oi...", mid.float(), up2,
                             down.reshape(down.shape[0], -1))
    elif down.dim() == 2:
        delta = up2 @ down
    else:
        delta = torch.einsum("or,rihw->oihw", up2, down)
    return delta * scale


def delta_from_tensors(t: dict, shape: tuple) -> torch.Tensor:
    up, down = t["lora_up.weight"], t["lora_down.weight"]
    rank = down.shape[0]
    alpha = float(t["alpha"].float()) if "alpha" in t else rank
    return lora_delta(up, down, t.get("lora_mid.weight"), alpha / rank).reshape(shape)


class LoRAModule(Adapter):
    algo = "lora"
    plus_names = ("lora_up",)

    def _build(self, rank: int, alpha: float | None) -> None:
        if rank < 1:
            raise ValueError(f"{self.lora_name}: LoRA rank must be >= 1, got {rank}")
        base = self.base
        self.tucker = False
        if isinstance(base, nn.Linear):
            self.lora_down = nn.Linear(base.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        else:
            k = tuple(base.kernel_size)
            if self.spec.use_tucker and k != (1, 1):
                self.tucker = True
                self.lora_down = nn.Conv2d(base.in_channels, rank, 1, bias=False)
                self.lora_mid = nn.Conv2d(rank, rank, k, base.stride, base.padding,
                                          bias=False)
            else:
                self.lora_down = nn.Conv2d(base.in_channels, rank, k, base.stride,
                                           base.padding, bias=False)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, 1, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        if self.spec.use_scalar:  # LyCORIS: up random, the scalar (0) makes ΔW zero
            nn.init.kaiming_uniform_(self.lora_up.weight, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_up.weight)
        if self.tucker:
            nn.init.kaiming_uniform_(self.lora_mid.weight, a=math.sqrt(5))
        self.float()
        self._set_alpha(alpha, rank)

    def slots(self) -> dict[str, torch.Tensor]:
        out = {"lora_up.weight": self.lora_up.weight, "lora_down.weight": self.lora_down.weight}
        if self.tucker:
            out["lora_mid.weight"] = self.lora_mid.weight
        out["alpha"] = self.alpha
        return out

    def _delta(self) -> torch.Tensor:
        mid = self.lora_mid.weight if self.tucker else None
        return lora_delta(self.lora_up.weight, self.lora_down.weight, mid,
                          self.scale).reshape(self.weight_shape)

    # ---- the fast forward --------------------------------------------------------------
    def lora_input(self, x: torch.Tensor) -> torch.Tensor:
        """x as the down projection takes it: in the LoRA weights' dtype, except under
        autocast, which casts x and the weights to its own dtype anyway (a cast to fp32
        first would only add a copy of the activation per module and step)."""
        return self.adapter_input(x, self.lora_down.weight)

    def lora_out(self, x: torch.Tensor) -> torch.Tensor:
        """multiplier * scale * up(down(x)), computed in the LoRA weights' dtype."""
        if self._shared is not None:
            lx = self._shared.down(self, x)
        else:
            lx = self.lora_down(self.lora_input(x))
        if self.tucker:
            lx = self.lora_mid(lx)
        scale = self.multiplier * self.scale
        if self.training and self.dropout > 0:
            lx = F.dropout(lx, p=self.dropout)
        if self.training and self.rank_dropout > 0:
            shape = [lx.shape[0], self.rank] + [1] * (lx.dim() - 2)
            if isinstance(self.lora_down, nn.Linear):  # rank is the last dim
                shape = [lx.shape[0]] + [1] * (lx.dim() - 2) + [self.rank]
            keep = torch.rand(shape, device=lx.device) >= self.rank_dropout
            lx = lx * keep.to(lx.dtype)
            scale = scale / (1.0 - self.rank_dropout)
        out = self.lora_up(lx) * scale
        if self.spec.use_scalar:
            out = out * self.scalar
        return out

    def adapter_out(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.dora:
            return super().adapter_out(x)
        return self.lora_out(x)


class SharedInputDown:
    """One down projection for Linear LoRA modules whose base layers read the same input
    (the q, k and v projections of an attention layer): `torch.cat` of their down weights,
    one matmul, and each module takes its slice. Forward and backward then read the
    activation once instead of once per module, and the backward's input gradient is one
    matmul instead of several plus their sum (`batch_qkv_lora`, docs/TRAINING.md Speed).

    Whichever member is called first with an input computes every member's slice and keeps
    the others for them; a member called with another tensor object (not the same input)
    computes its own down projection, so the result never depends on the call order. The
    parameters stay the modules' own: saving, loading and the optimizer see no difference.
    """

    def __init__(self, members: list[LoRAModule]):
        if len(members) < 2:
            raise ValueError("a shared-input group needs at least two LoRA modules")
        if not all(isinstance(m, LoRAModule) and isinstance(m.lora_down, nn.Linear)
                   for m in members):
            raise TypeError("shared-input groups are for Linear LoRA modules")
        if len({m.lora_down.in_features for m in members}) != 1:
            raise ValueError("the modules of a shared-input group must take the same input "
                             "width")
        self.members = list(members)
        self._input: torch.Tensor | None = None
        self._pending: dict[int, torch.Tensor] = {}

    def down(self, member: LoRAModule, x: torch.Tensor) -> torch.Tensor:
        i = self.members.index(member)
        if self._input is x and i in self._pending:
            part = self._pending.pop(i)
            if not self._pending:
                self._input = None
            return part
        weight = torch.cat([m.lora_down.weight for m in self.members])
        parts = F.linear(member.lora_input(x), weight).split(
            [m.rank for m in self.members], dim=-1)
        self._input = x
        self._pending = {j: p for j, p in enumerate(parts) if j != i}
        return parts[i]
