"""The adapter family: one file per algorithm behind one shape (base.Adapter).

Adding an algorithm: write `networks/adapters/<name>.py` with an `Adapter` subclass and a
pure `delta_from_tensors(tensors, shape)`, then add one line to `ALGORITHMS`.

- `ALGORITHMS`: name -> (module class, the tensor suffix that marks it in a file, its pure
  ΔW function). Names are LyCORIS's `algo=` values; `ALIASES` maps LyCORIS's other spellings.
- `make_adapter`: the module for a target.
- `algo_of(tensors)`: which algorithm a file's module is (by its tensor names).
- `delta_from_tensors(tensors, shape, base_weight=None)`: ΔW (scale included) of one module
  of a file, whatever its algorithm; DoRA and (IA)³ need the base weight.
"""
from __future__ import annotations

from typing import Callable, Mapping, NamedTuple

import torch

from networks.adapters import full, ia3, loha, lokr, lora
from networks.adapters.base import Adapter, AdapterSpec, dora_weight


class Algorithm(NamedTuple):
    cls: type
    marker: tuple[str, ...]      # a file's module is this algorithm if it has any of these
    delta: Callable              # pure (tensors, shape) -> ΔW


ALGORITHMS: dict[str, Algorithm] = {
    "lora": Algorithm(lora.LoRAModule, ("lora_up.weight",), lora.delta_from_tensors),
    "loha": Algorithm(loha.LoHaModule, ("hada_w1_a",), loha.delta_from_tensors),
    "lokr": Algorithm(lokr.LoKrModule, ("lokr_w1", "lokr_w1_a"), lokr.delta_from_tensors),
    "full": Algorithm(full.FullModule, ("diff",), full.delta_from_tensors),
    "ia3": Algorithm(ia3.IA3Module, ("on_input",), ia3.delta_from_tensors),
}
# LyCORIS's other names for the same algorithms (its network_module_dict).
ALIASES = {"locon": "lora", "kron": "lokr", "hada": "loha", "diff": "full"}
# LyCORIS algorithms we do not build, with what to do instead.
REFUSED = {
    "glora": "GLoRA is not supported; use algo=lora, loha or lokr",
    "oft": "OFT (diag-oft) is not supported; use algo=lora, loha or lokr",
    "diag-oft": "OFT (diag-oft) is not supported; use algo=lora, loha or lokr",
    "boft": "BOFT is not supported; use algo=lora, loha or lokr",
    "dylora": "DyLoRA is not supported; use algo=lora",
    "tlora": "T-LoRA is not supported; use algo=lora",
}


def canonical(algo: str) -> str:
    """Our name of a LyCORIS algo spelling; ValueError for unknown or refused ones."""
    name = str(algo).strip().lower()
    name = ALIASES.get(name, name)
    if name in ALGORITHMS:
        return name
    if name in REFUSED:
        raise ValueError(REFUSED[name])
    raise ValueError(f"unknown algorithm {algo!r}; valid: "
                     f"{', '.join(sorted(set(ALGORITHMS) | set(ALIASES)))}")


def make_adapter(name: str, base, rank: int, alpha: float | None, spec: AdapterSpec,
                 **kwargs) -> Adapter:
    return ALGORITHMS[spec.algo].cls(name, base, rank, alpha, spec=spec, **kwargs)


def algo_of(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The algorithm of one module's tensors (suffix -> tensor), None if none matches."""
    for algo, entry in ALGORITHMS.items():
        if any(m in tensors for m in entry.marker):
            return algo
    return None


def delta_from_tensors(tensors: Mapping[str, torch.Tensor], shape: tuple,
                       base_weight: torch.Tensor | None = None) -> torch.Tensor:
    """ΔW in fp32, shaped `shape`, of one module of a file given its tensors by suffix
    (`lora_up.weight`, `hada_w1_a`, `lokr_w1`, `diff`, `weight`+`on_input`, `dora_scale`...):
    the algorithm is told by the names present. DoRA (`dora_scale`) and (IA)³ need the base
    weight (ValueError without it); the bias part of `full` (`diff_b`) is not included."""
    algo = algo_of(tensors)
    if algo is None:
        raise ValueError(f"no adapter tensors among {sorted(tensors)[:6]}")
    if algo == "ia3":
        delta = ia3.delta_from_tensors(dict(tensors), shape, base_weight)
    else:
        delta = ALGORITHMS[algo].delta(dict(tensors), shape)
    if "dora_scale" in tensors:
        if base_weight is None:
            raise ValueError("DoRA (dora_scale): the merged weight depends on the base "
                             "model's weight; give it")
        w = base_weight.float().reshape(shape)
        scale = tensors["dora_scale"].float()
        on_out = scale.shape[0] == shape[0] and (scale.dim() < 2 or scale.shape[1] == 1)
        delta = dora_weight(w, delta, scale, 1.0, on_out) - w
    return delta


def spec_from_tensors(t: Mapping[str, torch.Tensor], base_shape: tuple | None = None
                      ) -> tuple[int, float | None, AdapterSpec]:
    """(rank, alpha, spec) that rebuild the module a file's tensors (by suffix) describe."""
    algo = algo_of(t)
    if algo is None:
        raise ValueError(f"no adapter tensors among {sorted(t)[:6]}")
    alpha = float(t["alpha"].float()) if "alpha" in t else None
    dora = "dora_scale" in t
    on_out = True
    if dora and base_shape is not None:
        s = t["dora_scale"]
        on_out = not (s.dim() >= 2 and s.shape[0] == 1 and base_shape[0] != 1)
    common = dict(dora=dora, dora_on_out=on_out, use_scalar="scalar" in t)
    if algo == "lora":
        return t["lora_down.weight"].shape[0], alpha, AdapterSpec(
            "lora", use_tucker="lora_mid.weight" in t, **common)
    if algo == "loha":
        return t["hada_w1_b"].shape[0], alpha, AdapterSpec(
            "loha", use_tucker="hada_t1" in t, **common)
    if algo == "lokr":
        return lokr._rank(t) or 1, alpha, AdapterSpec(
            "lokr", use_tucker="lokr_t2" in t, kron_layout=lokr.layout_from_tensors(t),
            **common)
    if algo == "ia3":
        on_input = bool(int(t["on_input"].float().item()))
        return 1, None, AdapterSpec("ia3", on_input=on_input)
    return 1, None, AdapterSpec(algo)


def group_by_module(sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """`<stem>.<suffix>` keys -> stem -> {suffix: tensor}."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        stem, _, suffix = key.partition(".")
        out.setdefault(stem, {})[suffix] = value
    return out
