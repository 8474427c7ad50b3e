"""LoKr (LyCORIS's `lokr`, Yeh et al. 2023): a Kronecker product, ΔW = w1 ⊗ w2 · scale.
Out and in dims are split as out = a·b, in = c·d (`factorization`, LyCORIS's rule: the pair
nearest to `factor`, or to the square root with factor -1); w1 is [a, c], w2 [b, d(, kh, kw)].
Tiny files with a high effective rank: the usual choice for SDXL characters.

Tensors (LyCORIS's names): `lokr_w1` [a, c], or `lokr_w1_a` [a, r] · `lokr_w1_b` [r, c] with
`decompose_both` (when r < max(a, c) / 2); `lokr_w2` [b, d(, kh, kw)] when r >= max(b, d) / 2
or with `full_matrix`, else `lokr_w2_a` [b, r] · `lokr_w2_b` [r, d·kh·kw]; with `use_tucker`
on a k x k conv `lokr_t2` [r, r, kh, kw] and `lokr_w2_a` [r, b], `lokr_w2_b` [r, d].
`alpha`: scale = alpha / r, except when both w1 and w2 are full matrices: then LyCORIS
writes alpha = r and the scale is 1.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from networks.adapters.base import Adapter


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m·n = dimension and m <= n: m = factor when it divides, else the most
    balanced split whose smaller part is at most `factor` (LyCORIS's table: 128 -> (8, 16)
    with -1, 320 -> (8, 40) with 8, 127 -> (1, 127))."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def _tucker(t, a, b):
    return torch.einsum("ij...,ip,jr->pr...", t.float(), a.float(), b.float())


def lokr_delta(w1=None, w1a=None, w1b=None, w2=None, w2a=None, w2b=None, t2=None,
               scale: float = 1.0) -> torch.Tensor:
    """scale · kron(w1, w2) in fp32, each half rebuilt from its factors first."""
    w1 = w1.float() if w1 is not None else w1a.float() @ w1b.float()
    if w2 is None:
        w2 = _tucker(t2, w2a, w2b) if t2 is not None else w2a.float() @ w2b.float()
    w2 = w2.float()
    while w1.dim() < w2.dim():
        w1 = w1.unsqueeze(-1)
    return torch.kron(w1, w2.contiguous()) * scale


def _both_full(t: dict) -> bool:
    return "lokr_w1" in t and "lokr_w2" in t


def _rank(t: dict) -> int | None:
    if "lokr_w1_a" in t:
        return t["lokr_w1_a"].shape[1]
    if "lokr_t2" in t:
        return t["lokr_t2"].shape[0]
    if "lokr_w2_a" in t:
        return t["lokr_w2_a"].shape[1]
    return None


def delta_from_tensors(t: dict, shape: tuple) -> torch.Tensor:
    rank = _rank(t)
    scale = 1.0
    if not _both_full(t) and rank and "alpha" in t:
        scale = float(t["alpha"].float()) / rank
    return lokr_delta(t.get("lokr_w1"), t.get("lokr_w1_a"), t.get("lokr_w1_b"),
                      t.get("lokr_w2"), t.get("lokr_w2_a"), t.get("lokr_w2_b"),
                      t.get("lokr_t2"), scale).reshape(shape)


def layout_from_tensors(t: dict) -> tuple[int, int, bool, bool]:
    """(a, c, w1 full, w2 full) of a file's LoKr module: AdapterSpec.kron_layout."""
    a, c = t["lokr_w1"].shape if "lokr_w1" in t else \
        (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])
    return int(a), int(c), "lokr_w1" in t, "lokr_w2" in t


class LoKrModule(Adapter):
    algo = "lokr"

    def _build(self, rank: int, alpha: float | None) -> None:
        spec = self.spec
        out_dim, in_dim, *k = self.weight_shape
        if spec.kron_layout is not None:
            a, c, self.use_w1, self.use_w2 = spec.kron_layout
            if out_dim % a or in_dim % c:
                raise ValueError(f"{self.lora_name}: LoKr w1 [{a}, {c}] does not divide the "
                                 f"weight {tuple(self.weight_shape)}")
            b, d = out_dim // a, in_dim // c
        else:
            if rank < 1:
                raise ValueError(f"{self.lora_name}: LoKr rank must be >= 1, got {rank}")
            c, d = factorization(in_dim, spec.factor)
            a, b = factorization(out_dim, spec.factor)
            if spec.unbalanced_factorization:
                a, b = b, a
            self.use_w1 = not (spec.decompose_both and rank < max(a, c) / 2
                               and not spec.full_matrix)
            self.use_w2 = bool(spec.full_matrix or rank >= max(b, d) / 2)
        self.tucker = bool(spec.use_tucker and k and any(i != 1 for i in k)
                           and not self.use_w2)
        self.kron_shape = (a, b, c, d)
        if self.use_w1:
            self.lokr_w1 = nn.Parameter(torch.empty(a, c))
        else:
            self.lokr_w1_a = nn.Parameter(torch.empty(a, rank))
            self.lokr_w1_b = nn.Parameter(torch.empty(rank, c))
        if self.use_w2:
            self.lokr_w2 = nn.Parameter(torch.empty(b, d, *k))
        elif self.tucker:
            self.lokr_t2 = nn.Parameter(torch.empty(rank, rank, *k))
            self.lokr_w2_a = nn.Parameter(torch.empty(rank, b))
            self.lokr_w2_b = nn.Parameter(torch.empty(rank, d))
        else:
            flat = d * (int(torch.tensor(k).prod()) if k else 1)
            self.lokr_w2_a = nn.Parameter(torch.empty(b, rank))
            self.lokr_w2_b = nn.Parameter(torch.empty(rank, flat))
        # LyCORIS's init: w2 (or w2_b) zero so ΔW starts at zero; random with use_scalar.
        zero_or_random = (lambda p: nn.init.kaiming_uniform_(p, a=math.sqrt(5))) \
            if spec.use_scalar else nn.init.zeros_
        if self.use_w2:
            zero_or_random(self.lokr_w2)
        else:
            if self.tucker:
                nn.init.kaiming_uniform_(self.lokr_t2, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))
            zero_or_random(self.lokr_w2_b)
        if self.use_w1:
            nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        else:
            nn.init.kaiming_uniform_(self.lokr_w1_a, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lokr_w1_b, a=math.sqrt(5))
        if self.use_w1 and self.use_w2:  # LyCORIS: no low-rank part, so no alpha scaling
            alpha = rank
        self._set_alpha(alpha, rank)

    def _scale_from_alpha(self) -> None:
        self.scale = 1.0 if self.use_w1 and self.use_w2 else float(self.alpha) / self.rank

    def slots(self) -> dict[str, torch.Tensor]:
        out = {}
        if self.use_w1:
            out["lokr_w1"] = self.lokr_w1
        else:
            out["lokr_w1_a"], out["lokr_w1_b"] = self.lokr_w1_a, self.lokr_w1_b
        if self.use_w2:
            out["lokr_w2"] = self.lokr_w2
        else:
            out["lokr_w2_a"], out["lokr_w2_b"] = self.lokr_w2_a, self.lokr_w2_b
            if self.tucker:
                out["lokr_t2"] = self.lokr_t2
        out["alpha"] = self.alpha
        return out

    def _delta(self) -> torch.Tensor:
        s = self.slots()
        return lokr_delta(s.get("lokr_w1"), s.get("lokr_w1_a"), s.get("lokr_w1_b"),
                          s.get("lokr_w2"), s.get("lokr_w2_a"), s.get("lokr_w2_b"),
                          s.get("lokr_t2"), self.scale).reshape(self.weight_shape)
