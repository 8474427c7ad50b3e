"""Our network of adapters on nn.Linear / nn.Conv2d, named in kohya's vocabulary.

Each adapter (networks/adapters/: LoRA/LoCon, LoHa, LoKr, full, (IA)3, DoRA as an option)
wraps one base module by replacing its `forward` (the base module stays in place, so the
UNet's own state_dict is untouched) and adds its term, e.g. for LoRA

    y = base(x) + multiplier * (alpha / rank) * up(down(x))

A fresh network equals the base (one factor of each adapter is zero-initialised). The
adapter weights are fp32 master weights whatever the base dtype; merging is computed in fp32
and unmerging restores the saved original weights bit for bit.

`LoRANetwork` owns the modules by their kohya key stem (`lora_unet_...`, `lora_te1_...`) and
reads/writes the kohya/LyCORIS state dict (`<stem>.lora_down.weight`, `.hada_w1_a`,
`.lokr_w1`, `.alpha` ...: each adapter names its own tensors).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from networks.adapters import make_adapter
from networks.adapters.base import Adapter, AdapterSpec
from networks.adapters.lora import LoRAModule, SharedInputDown

__all__ = ["Adapter", "AdapterSpec", "LoRAModule", "LoRANetwork", "SharedInputDown", "Target"]


@dataclass(frozen=True)
class Target:
    """One module to adapt: its kohya key stem, the module, its rank and alpha, and (when
    it differs from the network's) its algorithm and options."""
    name: str
    module: nn.Module
    rank: int
    alpha: float
    spec: AdapterSpec | None = None


class LoRANetwork(nn.Module):
    """All adapter modules of one run, keyed by kohya key stem; `spec` is the algorithm and
    options of every target that has none of its own."""

    def __init__(self, targets: list[Target], *, multiplier: float = 1.0, dropout: float = 0.0,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0,
                 spec: AdapterSpec | None = None):
        super().__init__()
        if not targets:
            raise ValueError("no modules to attach LoRA to")
        names = [t.name for t in targets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate LoRA module names: {dupes[:5]}")
        spec = spec or AdapterSpec()
        self.spec = spec
        self.loras = nn.ModuleDict({
            t.name: make_adapter(t.name, t.module, t.rank, t.alpha, t.spec or spec,
                                 multiplier=multiplier, dropout=dropout,
                                 rank_dropout=rank_dropout, module_dropout=module_dropout)
            for t in targets})

    @property
    def algos(self) -> set[str]:
        """The algorithms of the modules ("lora", "loha", ...)."""
        return {m.spec.algo for m in self}

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
    def kohya_state_dict(self, dtype: torch.dtype = torch.float16, raw: bool = False
                         ) -> dict[str, torch.Tensor]:
        """The file's tensors, `<stem>.<suffix>`, each adapter naming its own. `raw`: as
        trained (LyCORIS's use_scalar kept apart as `.scalar`), for exact resumes."""
        sd = {}
        for name, m in self.loras.items():
            for suffix, t in m.file_tensors(raw=raw).items():
                sd[f"{name}.{suffix}"] = t.detach().to("cpu", dtype)
        return {k: v.contiguous() for k, v in sd.items()}

    def load_kohya_state_dict(self, sd: dict[str, torch.Tensor], source: str = "state dict",
                              strict: bool = True) -> None:
        """Load kohya/LyCORIS keys; names missing / unexpected keys and shape mismatches.

        Everything is validated before anything is copied. A missing `.alpha` is allowed and
        means alpha = rank (scale 1); a missing `.scalar` (files) means the scalar is folded in.
        """
        expected, optional = {}, set()
        for name, m in self.loras.items():
            for suffix, t in m.expected().items():
                expected[f"{name}.{suffix}"] = t
                if suffix in m.OPTIONAL:
                    optional.add(f"{name}.{suffix}")
        missing = sorted(k for k in expected if k not in sd and k not in optional)
        unexpected = sorted(k for k in sd if k not in expected)
        shapes = [f"{k}: file {tuple(sd[k].shape)} vs network {tuple(p.shape)}"
                  for k, p in expected.items() if k in sd and sd[k].shape != p.shape]
        # (IA)3's layout flag: the network was built for one axis, the file must agree
        axes = [f"{k}: file {int(sd[k].float().item())} vs network {int(p.item())}"
                for k, p in expected.items() if k.endswith(".on_input") and k in sd
                and sd[k].numel() == 1 and int(sd[k].float().item()) != int(p.item())]
        problems = []
        if axes:
            problems.append(f"{len(axes)} (IA)3 on_input flags differ (set train_on_input "
                            f"to match the file), e.g. {axes[:3]}")
        if strict and missing:
            problems.append(f"{len(missing)} missing keys, e.g. {missing[:3]}")
        if strict and unexpected:
            problems.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[:3]}")
        if shapes:
            problems.append(f"{len(shapes)} shape mismatches, e.g. {shapes[:3]}")
        if problems:
            raise ValueError(f"{source}: does not match this network (check network_dim, "
                             f"conv_dim, the algorithm and the base model): "
                             + "; ".join(problems))
        with torch.no_grad():
            for k, p in expected.items():
                if k in sd:
                    p.copy_(sd[k].to(p.dtype))
        # A module loaded from a file without its alpha has scale 1, as every other
        # loader reads that file (LORA_FORMAT.md), not the alpha this network was built with.
        for name, m in self.loras.items():
            present = {s for s in m.expected() if f"{name}.{s}" in sd}
            if present:
                m.loaded(present)
