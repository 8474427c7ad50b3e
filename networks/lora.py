"""Our LoRA: low-rank adapters on nn.Linear / nn.Conv2d, named in kohya's vocabulary.

A `LoRAModule` wraps one base module by replacing its `forward` (the base module stays in
place, so the UNet's own state_dict is untouched) and adds

    y = base(x) + multiplier * (alpha / rank) * up(down(x))

`down` is kaiming-initialised and `up` zero-initialised, so a fresh network equals the base.
The LoRA weights are fp32 master weights whatever the base dtype; merging is computed in fp32
and unmerging restores the saved original weights bit for bit.

`LoRANetwork` owns the modules by their kohya key stem (`lora_unet_...`, `lora_te1_...`) and
reads/writes the kohya state dict (`<stem>.lora_down.weight`, `.lora_up.weight`, `.alpha`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Target:
    """One module to adapt: its kohya key stem, the module, its rank and alpha."""
    name: str
    module: nn.Module
    rank: int
    alpha: float


class LoRAModule(nn.Module):
    def __init__(self, name: str, base: nn.Module, rank: int, alpha: float | None = None,
                 multiplier: float = 1.0, dropout: float = 0.0, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"{name}: LoRA rank must be >= 1, got {rank}")
        self.lora_name = name
        self.rank = rank
        alpha = float(rank if alpha is None or alpha == 0 else alpha)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        self.scale = alpha / rank
        self.multiplier = multiplier
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, \
            module_dropout
        if isinstance(base, nn.Linear):
            self.lora_down = nn.Linear(base.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        elif isinstance(base, nn.Conv2d):
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride,
                                       base.padding, bias=False)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, 1, bias=False)
        else:
            raise TypeError(f"{name}: LoRA supports nn.Linear and nn.Conv2d, got "
                            f"{type(base).__name__}")
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.lora_down.float()
        self.lora_up.float()
        # The base module is referenced, not registered: its weights are not ours to save.
        self._base = [base]
        self._attached = False
        self._saved_forward = None
        self._merged_backup: torch.Tensor | None = None
        self._shared: SharedInputDown | None = None  # set by LoRANetwork.share_input

    @property
    def base(self) -> nn.Module:
        return self._base[0]

    # ---- attach / detach -------------------------------------------------------------
    def attach(self) -> None:
        """Route the base module's forward through this LoRA; idempotent.

        An explicit flag (not `_saved_forward`, which is None for a base that uses its class
        forward) guards re-entry: attaching twice would otherwise wrap our own forward and
        recurse forever.
        """
        if self._attached:
            return
        base = self.base
        self._saved_forward = base.__dict__.get("forward")  # None: the class method
        self._base_forward = base.forward
        base.forward = self.forward
        self._attached = True

    def detach(self) -> None:
        """Restore the forward the base had before attach; a no-op when not attached (an
        instance forward someone else installed is left alone)."""
        if not self._attached:
            return
        if self._saved_forward is None:
            self.base.__dict__.pop("forward", None)
        else:
            self.base.forward = self._saved_forward
        self._saved_forward = None
        self._attached = False

    # ---- math --------------------------------------------------------------------------
    def lora_input(self, x: torch.Tensor) -> torch.Tensor:
        """x as the down projection takes it: in the LoRA weights' dtype, except under
        autocast, which casts x and the weights to its own dtype anyway (a cast to fp32
        first would only add a copy of the activation per module and step)."""
        if torch.is_autocast_enabled(x.device.type):
            return x
        return x.to(self.lora_down.weight.dtype)

    def lora_out(self, x: torch.Tensor) -> torch.Tensor:
        """multiplier * scale * up(down(x)), computed in the LoRA weights' dtype."""
        if self._shared is not None:
            lx = self._shared.down(self, x)
        else:
            lx = self.lora_down(self.lora_input(x))
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
        return self.lora_up(lx) * scale

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self._base_forward(x, *args, **kwargs)
        # Multiplier 0 skips the LoRA at inference; in training it still runs (times 0), as
        # in kohya, so a batch of a network_multiplier = 0 dataset gives zero gradients
        # (the optimizer steps as usual) instead of a loss without a graph.
        if self._merged_backup is not None or (self.multiplier == 0 and not self.training):
            return out
        if self.training and self.module_dropout > 0 and \
                torch.rand((), device="cpu").item() < self.module_dropout:
            return out
        return out + self.lora_out(x).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """multiplier * scale * up @ down in fp32, shaped like the base weight."""
        up = self.lora_up.weight.float()
        down = self.lora_down.weight.float()
        if up.dim() == 2:
            delta = up @ down
        else:  # conv: up is [out, r, 1, 1], down is [r, in, kh, kw]
            delta = torch.einsum("or,rihw->oihw", up[:, :, 0, 0], down)
        return delta * (self.multiplier * self.scale)

    def merge(self) -> None:
        """Fold the LoRA into the base weight (fp32 math); idempotent."""
        if self._merged_backup is not None:
            return
        w = self.base.weight
        self._merged_backup = w.detach().clone()
        with torch.no_grad():
            w.copy_((w.float() + self.delta_weight().to(w.device)).to(w.dtype))

    def unmerge(self) -> None:
        if self._merged_backup is None:
            return
        with torch.no_grad():
            self.base.weight.copy_(self._merged_backup)
        self._merged_backup = None


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
        if not all(isinstance(m.lora_down, nn.Linear) for m in members):
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


class LoRANetwork(nn.Module):
    """All LoRA modules of one run, keyed by kohya key stem."""

    def __init__(self, targets: list[Target], *, multiplier: float = 1.0, dropout: float = 0.0,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0):
        super().__init__()
        if not targets:
            raise ValueError("no modules to attach LoRA to")
        names = [t.name for t in targets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate LoRA module names: {dupes[:5]}")
        self.loras = nn.ModuleDict({
            t.name: LoRAModule(t.name, t.module, t.rank, t.alpha, multiplier, dropout,
                               rank_dropout, module_dropout)
            for t in targets})

    def __iter__(self):
        return iter(self.loras.values())

    def __len__(self):
        return len(self.loras)

    def attach(self) -> "LoRANetwork":
        for m in self:
            m.attach()
        return self

    def detach(self) -> None:
        for m in self:
            m.unmerge()
            m.detach()

    def merge(self) -> None:
        for m in self:
            m.merge()

    def share_input(self, members: list[LoRAModule]) -> None:
        """Compute the down projections of `members` (Linear LoRA modules of this network
        whose base layers are called with the same input) as one matmul: SharedInputDown."""
        mine = set(map(id, self))
        if any(id(m) not in mine for m in members):
            raise ValueError("share_input: every member must be a module of this network")
        group = SharedInputDown(members)
        for m in members:
            if m._shared is not None:
                raise ValueError(f"{m.lora_name} is in a shared-input group already")
        for m in members:
            m._shared = group

    def shared_groups(self) -> list[SharedInputDown]:
        seen = {}
        for m in self:
            if m._shared is not None:
                seen[id(m._shared)] = m._shared
        return list(seen.values())

    def unmerge(self) -> None:
        for m in self:
            m.unmerge()

    def set_multiplier(self, multiplier: float) -> None:
        for m in self:
            m.multiplier = multiplier

    def parts(self) -> dict[str, list[LoRAModule]]:
        """Modules grouped by prefix: 'lora_unet', 'lora_te', 'lora_te1', 'lora_te2'."""
        groups: dict[str, list[LoRAModule]] = {}
        for name, m in self.loras.items():
            prefix = name.split("_")[0] + "_" + name.split("_")[1]
            groups.setdefault(prefix, []).append(m)
        return groups

    # ---- kohya state dict -------------------------------------------------------------
    def kohya_state_dict(self, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
        sd = {}
        for name, m in self.loras.items():
            sd[f"{name}.lora_down.weight"] = m.lora_down.weight.detach().to("cpu", dtype)
            sd[f"{name}.lora_up.weight"] = m.lora_up.weight.detach().to("cpu", dtype)
            sd[f"{name}.alpha"] = m.alpha.detach().to("cpu", dtype)
        return {k: v.contiguous() for k, v in sd.items()}

    def load_kohya_state_dict(self, sd: dict[str, torch.Tensor], source: str = "state dict",
                              strict: bool = True) -> None:
        """Load kohya keys; names missing / unexpected keys and shape mismatches.

        Everything is validated before anything is copied. A missing `.alpha` is allowed and
        means alpha = rank (scale 1).
        """
        expected = {}
        for name, m in self.loras.items():
            expected[f"{name}.lora_down.weight"] = m.lora_down.weight
            expected[f"{name}.lora_up.weight"] = m.lora_up.weight
            expected[f"{name}.alpha"] = m.alpha
        missing = sorted(k for k in expected if k not in sd and not k.endswith(".alpha"))
        unexpected = sorted(k for k in sd if k not in expected)
        shapes = [f"{k}: file {tuple(sd[k].shape)} vs network {tuple(p.shape)}"
                  for k, p in expected.items() if k in sd and sd[k].shape != p.shape]
        problems = []
        if strict and missing:
            problems.append(f"{len(missing)} missing keys, e.g. {missing[:3]}")
        if strict and unexpected:
            problems.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")
        if shapes:
            problems.append(f"{len(shapes)} shape mismatches, e.g. {shapes[:3]}")
        if problems:
            raise ValueError(f"{source}: does not match this network (check network_dim, "
                             f"conv_dim and the base model): " + "; ".join(problems))
        with torch.no_grad():
            for k, p in expected.items():
                if k in sd:
                    p.copy_(sd[k].to(p.dtype))
            # A module loaded from a file without its alpha has scale 1, as every other
            # loader reads that file (LORA_FORMAT.md), not the alpha this network was built with.
            for name, m in self.loras.items():
                if f"{name}.lora_down.weight" in sd and f"{name}.alpha" not in sd:
                    m.alpha.fill_(m.rank)
        for m in self:
            m.scale = float(m.alpha) / m.rank
