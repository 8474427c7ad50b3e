"""Writing the tools' LoRA files: kohya keys, one alpha per part (networks.file_rules), the
requested precision, hashes, and metadata carried over from the inputs with the change noted.
"""
from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from pathlib import Path
from typing import Mapping

import torch

from networks.file_rules import is_linear_like, modules, part_of
from networks.kohya_file import write_lora

PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32,
              "fp32": torch.float32}


def check_output(path: str | Path, overwrite: bool, *, suffix: str | None = ".safetensors"
                 ) -> Path:
    """The output path, or a ValueError before any work: exists (without --overwrite), or
    the wrong kind of name."""
    p = Path(path)
    if suffix and p.suffix.lower() != suffix:
        raise ValueError(f"--save_to {p}: must end in {suffix}")
    if p.exists() and not overwrite:
        raise ValueError(f"--save_to {p}: exists; pass --overwrite or choose another name")
    if not p.parent.exists():
        raise ValueError(f"--save_to {p}: folder {p.parent} does not exist")
    return p


def save_dtype(precision: str | None, default: torch.dtype) -> torch.dtype:
    return PRECISIONS[precision] if precision else default


def file_dtype(tensors) -> torch.dtype:
    """The dtype most of a file's weights have (what 'keep the precision' keeps)."""
    counts: dict[torch.dtype, int] = {}
    for t in tensors:
        if t.dim() >= 2:
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def kohya_tensors(factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """{stem: (up, down, alpha)} -> kohya state dict in `dtype`, with one alpha per part for
    the Linear/1x1 modules (LORA_FORMAT.md): as networks.file_rules.uniform_alphas, the most
    common alpha of the group is written and alpha_m / alpha_u is baked into lora_up in fp32
    before the cast. `factors` is emptied module by module, so the fp32 factors and the
    output never both exist whole (a rank-128 SDXL resize would otherwise hold both)."""
    groups: dict[tuple[str, bool], list[float]] = {}
    for stem, (up, down, alpha) in factors.items():
        groups.setdefault((part_of(stem), is_linear_like(down)), []).append(float(alpha))
    common = {g: Counter(a).most_common(1)[0][0] for g, a in groups.items()}
    sd = {}
    for stem in list(factors):
        up, down, alpha = factors.pop(stem)
        linear = is_linear_like(down)
        target = common[(part_of(stem), linear)] if linear else float(alpha)
        if float(alpha) != target:
            up = up.float() * (float(alpha) / target)
        sd[f"{stem}.lora_down.weight"] = down.to(dtype).contiguous()
        sd[f"{stem}.lora_up.weight"] = up.to(dtype).contiguous()
        sd[f"{stem}.alpha"] = torch.tensor(target, dtype=dtype)
        del up, down
    return sd


def summary_dims(sd: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """ss_network_dim / alpha (and conv_dim / conv_alpha in ss_network_args) of a kohya state
    dict: the value when all modules agree, else "Dynamic" (sd-scripts' word)."""
    lin, conv = set(), set()
    for t in modules(sd).values():
        if "down" in t:
            rank = t["down"].shape[0]
            alpha = float(t["alpha"].float()) if "alpha" in t else float(rank)
            (lin if is_linear_like(t["down"]) else conv).add((rank, alpha))

    def one(values, i):
        vals = {v[i] for v in values}
        return f"{vals.pop():g}" if len(vals) == 1 else "Dynamic"

    out = {"ss_network_dim": one(lin, 0) if lin else "None",
           "ss_network_alpha": one(lin, 1) if lin else "None"}
    if conv:
        out["ss_network_args"] = json.dumps({"conv_dim": one(conv, 0),
                                             "conv_alpha": one(conv, 1)})
    return out


def carry_metadata(meta: Mapping[str, str], note: str, **changes: str) -> dict[str, str]:
    """The input's metadata (hashes dropped: the writer recomputes them) with `changes` and
    `note` put in front of ss_training_comment, as sd-scripts' tools do."""
    out = {k: v for k, v in meta.items() if not k.startswith("sshs_")}
    if "ss_network_args" in changes and out.get("ss_network_args"):
        try:  # keep the other network_args of the original run
            merged = json.loads(out["ss_network_args"]) or {}
            merged.update(json.loads(changes["ss_network_args"]))
            changes["ss_network_args"] = json.dumps(merged)
        except (json.JSONDecodeError, TypeError, AttributeError):
            pass
    out.update(changes)
    old = out.get("ss_training_comment", "")
    out["ss_training_comment"] = f"{note}; {old}" if old and old != "None" else note
    out.setdefault("ss_network_module", "networks.lora")
    if "modelspec.date" in out:
        out["modelspec.date"] = dt.datetime.now().strftime("%Y-%m-%dT%H:%M:%S")
    return out


def write_kohya(path: Path, tensors: Mapping[str, torch.Tensor],
                metadata: Mapping[str, str]) -> None:
    """Atomic write with the A1111 hashes (networks.kohya_file)."""
    write_lora(path, dict(tensors), dict(metadata))
