"""LoHa (Hyeon-Woo et al. 2022, FedPara; LyCORIS's `loha`): the Hadamard product of two
low-rank products, ΔW = (w1_a · w1_b) ⊙ (w2_a · w2_b) · alpha / rank. Rank r reaches an
effective rank up to r², which is why LoHa is a common choice for styles.

Tensors (LyCORIS's names): `hada_w1_a` [out, r], `hada_w1_b` [r, in·kh·kw], `hada_w2_a`,
`hada_w2_b` the same, `alpha`. With `use_tucker` on a k x k conv: `hada_t1`, `hada_t2`
[r, r, kh, kw] and `hada_w*_a` [r, out], `hada_w*_b` [r, in]; each factor is then
t ×₁ w_a ×₂ w_b. Init as LyCORIS: w1 ~ N(0, 0.1 / 1), w2_a = 0 (ΔW starts at zero).
"""
from __future__ import annotations

import torch
from torch import nn

from networks.adapters.base import Adapter


def _factor(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    if t is None:
        return a.float() @ b.float()
    return torch.einsum("ij...,ip,jr->pr...", t.float(), a.float(), b.float())


def loha_delta(w1a, w1b, w2a, w2b, t1=None, t2=None, scale: float = 1.0) -> torch.Tensor:
    """scale · (w1a·w1b) ⊙ (w2a·w2b) in fp32 (Tucker: each factor t ×₁ a ×₂ b)."""
    return _factor(w1a, w1b, t1) * _factor(w2a, w2b, t2) * scale


def delta_from_tensors(t: dict, shape: tuple) -> torch.Tensor:
    rank = t["hada_w1_b"].shape[0]
    alpha = float(t["alpha"].float()) if "alpha" in t else rank
    return loha_delta(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"],
                      t.get("hada_t1"), t.get("hada_t2"), alpha / rank).reshape(shape)


class LoHaModule(Adapter):
    algo = "loha"

    def _build(self, rank: int, alpha: float | None) -> None:
        if rank < 1:
            raise ValueError(f"{self.lora_name}: LoHa rank must be >= 1, got {rank}")
        out_dim, in_dim, *k = self.weight_shape
        self.tucker = bool(self.spec.use_tucker and k and any(i != 1 for i in k))
        if self.tucker:
            self.hada_t1 = nn.Parameter(torch.empty(rank, rank, *k))
            self.hada_w1_a = nn.Parameter(torch.empty(rank, out_dim))
            self.hada_w1_b = nn.Parameter(torch.empty(rank, in_dim))
            self.hada_t2 = nn.Parameter(torch.empty(rank, rank, *k))
            self.hada_w2_a = nn.Parameter(torch.empty(rank, out_dim))
            self.hada_w2_b = nn.Parameter(torch.empty(rank, in_dim))
            nn.init.normal_(self.hada_t1, std=0.1)
            nn.init.normal_(self.hada_t2, std=0.1)
        else:
            flat_in = in_dim * (int(torch.tensor(k).prod()) if k else 1)
            self.hada_w1_a = nn.Parameter(torch.empty(out_dim, rank))
            self.hada_w1_b = nn.Parameter(torch.empty(rank, flat_in))
            self.hada_w2_a = nn.Parameter(torch.empty(out_dim, rank))
            self.hada_w2_b = nn.Parameter(torch.empty(rank, flat_in))
        nn.init.normal_(self.hada_w1_b, std=1)
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w2_b, std=1)
        if self.spec.use_scalar:
            nn.init.normal_(self.hada_w2_a, std=0.1)
        else:
            nn.init.zeros_(self.hada_w2_a)
        self._set_alpha(alpha, rank)

    def slots(self) -> dict[str, torch.Tensor]:
        out = {"hada_w1_a": self.hada_w1_a, "hada_w1_b": self.hada_w1_b,
               "hada_w2_a": self.hada_w2_a, "hada_w2_b": self.hada_w2_b}
        if self.tucker:
            out["hada_t1"], out["hada_t2"] = self.hada_t1, self.hada_t2
        out["alpha"] = self.alpha
        return out

    def _delta(self) -> torch.Tensor:
        t1 = self.hada_t1 if self.tucker else None
        t2 = self.hada_t2 if self.tucker else None
        return loha_delta(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b,
                          t1, t2, self.scale).reshape(self.weight_shape)
