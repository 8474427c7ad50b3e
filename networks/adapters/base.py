"""The shape every adapter shares: how it attaches to a base nn.Linear / nn.Conv2d, how its
delta enters the forward, how it merges, and how it names, writes and reads its tensors.

An algorithm (lora.py, loha.py, lokr.py, full.py, ia3.py) subclasses `Adapter` and writes

- `_build(rank, alpha)`: create its parameters (fp32 master weights),
- `_delta()`: its ΔW as a dense fp32 tensor shaped like the base weight, scale included,
  multiplier and DoRA not (a pure function of its tensors: the file's formula),
- `slots()`: its tensors by the suffix they have in a file (`hada_w1_a`, `lora_up.weight`...),
- optionally a faster `adapter_out(x)` than the rebuild path (LoRA does).

The base class then gives: attach/detach (the base module's forward is replaced, the base
module stays in place), the forward `base(x) + multiplier * ΔW x` with module dropout and
LyCORIS's rank dropout (rows of ΔW), DoRA (`dora_scale`, LyCORIS's weight_decompose: the
merged weight renormalised per output row, or per input column with `dora_on_out = False`),
`delta_weight()` (the effective dense ΔW incl. multiplier and DoRA: max-norm, merge, export),
merge/unmerge in fp32, and the file form of its tensors with LyCORIS's `use_scalar` folded in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class AdapterSpec:
    """Which algorithm and its options (LyCORIS's names in comments)."""
    algo: str = "lora"
    use_tucker: bool = False          # use_tucker: CP/Tucker core for k x k convs
    use_scalar: bool = False          # use_scalar: a trained scalar, init 0
    dora: bool = False                # dora_wd: weight decomposition (DoRA)
    dora_on_out: bool = True          # wd_on_output: DoRA norm per output row
    rank_dropout_scale: bool = False  # rank_dropout_scale: rescale kept rows by the mean
    rs_lora: bool = False             # rs_lora: scale alpha / sqrt(rank)
    factor: int = -1                  # LoKr: factor
    decompose_both: bool = False      # LoKr: decompose_both
    full_matrix: bool = False         # LoKr: full_matrix
    unbalanced_factorization: bool = False  # LoKr: unbalanced_factorization
    on_input: bool = False            # (IA)3: train_on_input
    # LoKr read from a file: (w1 rows, w1 cols, w1 full, w2 full), overriding the factor rule.
    kron_layout: tuple | None = None


def dora_norm(weight: torch.Tensor, on_out: bool) -> torch.Tensor:
    """‖W‖ per output row (on_out) or per input column, shaped to broadcast against W."""
    w = weight.float()
    ones = [1] * (w.dim() - 1)
    if on_out:
        return w.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *ones)
    n = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)
    return n.reshape(w.shape[1], *ones).transpose(0, 1)


def dora_weight(weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor,
                multiplier: float = 1.0, on_out: bool = True) -> torch.Tensor:
    """DoRA's merged weight: (W + ΔW) · m / ‖W + ΔW‖, the norm taken with LyCORIS's axis and
    eps; with a multiplier the magnitude ratio is interpolated: 1 + mult · (m/‖·‖ − 1)."""
    merged = weight.float() + delta
    ratio = dora_scale.float() / (dora_norm(merged, on_out) + torch.finfo(torch.float32).eps)
    if multiplier != 1:
        ratio = multiplier * (ratio - 1) + 1
    return merged * ratio


class Adapter(nn.Module):
    """One adapter on one base module (see the module doc)."""

    algo = "base"
    scale = 1.0  # alpha / rank where the algorithm has them (full and (IA)3 do not)
    # Suffixes a file may lack: alpha (means alpha = rank) and scalar (training state only).
    OPTIONAL = ("alpha", "scalar")
    # The parameters LoRA+ trains at lr x ratio (LyCORIS: names containing lora_up).
    plus_names: tuple[str, ...] = ()

    def __init__(self, name: str, base: nn.Module, rank: int = 4, alpha: float | None = None,
                 multiplier: float = 1.0, dropout: float = 0.0, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0, *, spec: AdapterSpec | None = None):
        super().__init__()
        spec = spec or AdapterSpec(algo=self.algo)
        if isinstance(base, nn.Linear):
            self.is_conv = False
            self.weight_shape = (base.out_features, base.in_features)
        elif isinstance(base, nn.Conv2d):
            self.is_conv = True
            self.weight_shape = (base.out_channels, base.in_channels // base.groups,
                                 *base.kernel_size)
        else:
            raise TypeError(f"{name}: {self.algo} supports nn.Linear and nn.Conv2d, got "
                            f"{type(base).__name__}")
        self.lora_name = name
        self.spec = spec
        self.rank = int(rank)
        self.multiplier = multiplier
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, \
            module_dropout
        # The base module is referenced, not registered: its weights are not ours to save.
        self._base = [base]
        self._attached = False
        self._saved_forward = None
        self._merged_backup: torch.Tensor | None = None
        self._merged_bias: torch.Tensor | None = None
        self._shared = None  # LoRA's SharedInputDown (batch_qkv_lora)
        self._build(self.rank, alpha)
        if spec.use_scalar:
            self.scalar = nn.Parameter(torch.tensor(0.0))
        else:
            self.register_buffer("scalar", torch.tensor(1.0), persistent=False)
        if spec.dora:
            self.dora_scale = nn.Parameter(dora_norm(base.weight.detach(), spec.dora_on_out)
                                           .to("cpu").float())

    # ---- to write per algorithm ------------------------------------------------------------
    def _build(self, rank: int, alpha: float | None) -> None:
        raise NotImplementedError

    def _delta(self) -> torch.Tensor:
        raise NotImplementedError

    def _delta_bias(self) -> torch.Tensor | None:
        return None

    def slots(self) -> dict[str, torch.Tensor]:
        """The tensors a file holds, by suffix, as stored here (scalar not folded in)."""
        raise NotImplementedError

    # ---- alpha -----------------------------------------------------------------------------
    def _set_alpha(self, alpha: float | None, rank: int) -> None:
        """LyCORIS's rule: alpha unset or 0 means alpha = rank; with rs_lora the scale is
        alpha / sqrt(rank) and the alpha written is alpha · sqrt(rank), so every loader that
        reads alpha / rank gets the same scale."""
        alpha = float(rank if alpha is None or alpha == 0 else alpha)
        r_factor = math.sqrt(rank) if self.spec.rs_lora else rank
        self.register_buffer("alpha", torch.tensor(alpha * rank / r_factor,
                                                   dtype=torch.float32))
        self.scale = alpha / r_factor

    def _scale_from_alpha(self) -> None:
        self.scale = float(self.alpha) / self.rank

    # ---- attach / detach -------------------------------------------------------------------
    @property
    def base(self) -> nn.Module:
        return self._base[0]

    def attach(self) -> None:
        """Route the base module's forward through this adapter; idempotent. An explicit flag
        guards re-entry: attaching twice would wrap our own forward and recurse forever."""
        if self._attached:
            return
        base = self.base
        self._saved_forward = base.__dict__.get("forward")  # None: the class method
        self._base_forward = base.forward
        base.forward = self.forward
        self._attached = True

    def detach(self) -> None:
        """Restore the forward the base had before attach; a no-op when not attached."""
        if not self._attached:
            return
        if self._saved_forward is None:
            self.base.__dict__.pop("forward", None)
        else:
            self.base.forward = self._saved_forward
        self._saved_forward = None
        self._attached = False

    # ---- forward ---------------------------------------------------------------------------
    def adapter_input(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """x in the adapter weights' dtype, except under autocast (which casts anyway)."""
        if torch.is_autocast_enabled(x.device.type):
            return x
        return x.to(like.dtype)

    def _op(self, x: torch.Tensor, weight: torch.Tensor,
            bias: torch.Tensor | None = None) -> torch.Tensor:
        if not self.is_conv:
            return F.linear(x, weight, bias)
        b = self.base
        return F.conv2d(x, weight, bias, b.stride, b.padding, b.dilation, b.groups)

    def _row_dropout(self, delta: torch.Tensor) -> torch.Tensor:
        """LyCORIS's rank dropout for algorithms without a rank axis: drop rows of ΔW."""
        keep = (torch.rand(delta.shape[0], device=delta.device) > self.rank_dropout)
        keep = keep.to(delta.dtype)
        if self.spec.rank_dropout_scale:
            keep = keep / keep.mean().clamp_min(1e-12)
        return delta * keep.view(-1, *[1] * (delta.dim() - 1))

    def training_delta(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(ΔW, Δbias) this forward applies: scalar, rank dropout, multiplier and DoRA."""
        delta = self._delta() * self.scalar
        if self.training and self.rank_dropout > 0:
            delta = self._row_dropout(delta)
        if self.spec.dora:
            w = self.base.weight.detach()
            delta = dora_weight(w, delta, self.dora_scale, self.multiplier,
                                self.spec.dora_on_out) - w.float()
        else:
            delta = delta * self.multiplier
        bias = self._delta_bias()
        if bias is not None:
            bias = bias * self.multiplier
        return delta, bias

    def adapter_out(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's term of the output: op(x, ΔW) with ΔW rebuilt each call (LyCORIS's
        default, non-bypass forward)."""
        delta, bias = self.training_delta()
        return self._op(self.adapter_input(x, delta), delta, bias)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self._base_forward(x, *args, **kwargs)
        # Multiplier 0 skips the adapter at inference; in training it still runs (times 0), as
        # in kohya, so a batch of a network_multiplier = 0 dataset gives zero gradients
        # (the optimizer steps as usual) instead of a loss without a graph.
        if self._merged_backup is not None or (self.multiplier == 0 and not self.training):
            return out
        if self.training and self.module_dropout > 0 and \
                torch.rand((), device="cpu").item() < self.module_dropout:
            return out
        return out + self.adapter_out(x).to(out.dtype)

    def original_weight(self) -> torch.Tensor:
        """The base weight as it was before any merge of this adapter."""
        return self._merged_backup if self._merged_backup is not None else \
            self.base.weight.detach()

    # ---- dense delta and merging -----------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """The effective ΔW in fp32, shaped like the base weight: multiplier, scale, scalar
        and DoRA included (what merging adds to the base weight)."""
        with torch.no_grad():
            delta = self._delta().float() * self.scalar.float()
            if self.spec.dora:
                w = self.original_weight()
                return dora_weight(w, delta, self.dora_scale, self.multiplier,
                                   self.spec.dora_on_out) - w.float()
            return delta * self.multiplier

    def max_norm_factors(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """For `scale_weight_norms` (networks/max_norm.py): the Frobenius norm of ΔW at
        multiplier 1 (scale and scalar included) and the trained tensors ΔW is linear in, each
        (LoRA's up and down, LoHa's four hada_w, LoKr's factors, full's diff, (IA)3's weight,
        a trained scalar). DoRA's update is renormalised per row, not such a product: it gets
        no factors and is left alone. A plain LoRA's norm comes from two rank x rank Gram
        matrices instead of the dense product."""
        if self.spec.dora:
            return torch.zeros(()), []
        slots = self.slots()
        factors = [t for k, t in slots.items()
                   if isinstance(t, nn.Parameter) and t.requires_grad and k != "diff_b"]
        if isinstance(self.scalar, nn.Parameter):
            factors.append(self.scalar)
        with torch.no_grad():
            if "lora_up.weight" in slots and "lora_mid.weight" not in slots:
                u = slots["lora_up.weight"].float().reshape(slots["lora_up.weight"].shape[0], -1)
                d = slots["lora_down.weight"].float()
                d = d.reshape(d.shape[0], -1)
                norm = ((u.T @ u) * (d @ d.T)).sum().clamp(min=0).sqrt() * abs(self.scale)
                norm = norm * self.scalar.float().abs()
            else:
                norm = (self._delta().float() * self.scalar.float()).norm()
        return norm, factors

    def delta_bias(self) -> torch.Tensor | None:
        b = self._delta_bias()
        return None if b is None else b.detach().float() * self.multiplier

    def merge(self) -> None:
        """Fold the adapter into the base weight (fp32 math); idempotent."""
        if self._merged_backup is not None:
            return
        w = self.base.weight
        delta = self.delta_weight().to(w.device)
        self._merged_backup = w.detach().clone()
        with torch.no_grad():
            w.copy_((w.float() + delta).to(w.dtype))
            db = self.delta_bias()
            if db is not None and self.base.bias is not None:
                self._merged_bias = self.base.bias.detach().clone()
                self.base.bias.copy_((self.base.bias.float() + db.to(w.device))
                                     .to(self.base.bias.dtype))

    def unmerge(self) -> None:
        if self._merged_backup is None:
            return
        with torch.no_grad():
            self.base.weight.copy_(self._merged_backup)
            if self._merged_bias is not None:
                self.base.bias.copy_(self._merged_bias)
        self._merged_backup = self._merged_bias = None

    # ---- tensors in files ------------------------------------------------------------------
    def _all_slots(self) -> dict[str, torch.Tensor]:
        slots = dict(self.slots())
        if self.spec.dora:
            slots["dora_scale"] = self.dora_scale
        return slots

    def file_tensors(self, raw: bool = False) -> dict[str, torch.Tensor]:
        """Suffix -> tensor as a file holds them: the scalar folded into the first tensor
        (LyCORIS's custom_state_dict). `raw`: as stored, plus `scalar` (training state)."""
        out = dict(self._all_slots())
        if self.spec.use_scalar:
            if raw:
                out["scalar"] = self.scalar
            else:
                first = next(iter(self.slots()))
                out[first] = out[first] * self.scalar
        return out

    def expected(self) -> dict[str, torch.Tensor]:
        """Suffix -> the tensor a load copies into (file_tensors(raw=True)'s keys)."""
        out = dict(self._all_slots())
        if self.spec.use_scalar:
            out["scalar"] = self.scalar
        return out

    def loaded(self, present: set[str]) -> None:
        """After a load copied the `present` suffixes: alpha missing means alpha = rank; a
        file (no scalar key) has the scalar folded in already."""
        if "alpha" in self.expected() and "alpha" not in present:
            with torch.no_grad():
                self.alpha.fill_(self.rank)
        if self.spec.use_scalar and "scalar" not in present:
            with torch.no_grad():
                self.scalar.fill_(1.0)
        if hasattr(self, "alpha"):
            self._scale_from_alpha()
