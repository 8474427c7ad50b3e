"""Checks run before any model loads (also by --dry_run), for what would otherwise fail late:
output and logging folders that cannot be written, a `network_weights` file that is not a
readable LoRA, and ranks larger than any layer of the model can use.

Ranks: a LoRA of rank r on a layer with `in` inputs and `out` outputs can use at most
min(in, out) (a 3x3 conv: min(9 * in, out)); beyond that the extra rank only costs memory.
`network_dim` (and `conv_dim`) above the largest such value of any targeted layer, read
from the model's config files without loading weights, is refused with the largest useful
value: such a rank is a typo (100000 for 100), and would fail later building the network.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def preflight_problems(cfg, model_dir: Path, family, net_args) -> list[str]:
    """Every problem of this module for the run, one line each."""
    return output_problems(cfg) + rank_problems(cfg, model_dir, family, net_args) + \
        [p for p in [lora_file_problem(cfg.lora.network_weights, family.te_prefixes)] if p]


def _writable_problem(key: str, value: str | None) -> str | None:
    """Can `value` be created (or written, if it exists) as a folder? Nothing is created."""
    if not value:
        return None
    path = Path(value).expanduser().absolute()
    if path.exists() and not path.is_dir():
        return f"{key}: {value!r} is a file, not a folder; choose a folder"
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return f"{key}: {value!r} lies under {probe}, which is a file; choose another folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{key}: cannot write to {probe} (permission denied); choose a writable folder"
    return None


def output_problems(cfg) -> list[str]:
    """output_dir and logging_dir can be written (checked without writing)."""
    out = [_writable_problem("output_dir", cfg.saving.output_dir),
           _writable_problem("logging_dir", cfg.logging.logging_dir)]
    return [p for p in out if p]


def lora_file_problem(path: str | None, te_prefixes: tuple[str, ...] = ()) -> str | None:
    """A network_weights file that safetensors cannot open, that holds no LoRA keys, or
    whose text-encoder keys belong to another model family (`te_prefixes`: this family's):
    found from its header alone (cheap), before the model loads."""
    if not path:
        return None
    from safetensors import safe_open
    from networks.from_file import detect_layout
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
    except Exception as e:  # SafetensorError, OSError: torn, empty, bad header
        return (f"network_weights: {path} is not a readable .safetensors file ({e}); it may "
                "be truncated or damaged: copy it again")
    try:
        detect_layout(dict.fromkeys(keys))
    except ValueError as e:
        return f"network_weights: {path}: {e}"
    other = sorted({k.split("_", 2)[0] + "_" + k.split("_", 2)[1] for k in keys
                    if k.startswith("lora_te")} - set(te_prefixes)) if te_prefixes else []
    if other:
        return (f"network_weights: {path} has text-encoder keys {other[0]}_... of another "
                f"model family (this model's are {', '.join(te_prefixes)}_...); use a LoRA "
                "made for this base model")
    return None


def _configs(model, model_dir: Path, family) -> tuple[dict, list[dict]] | None:
    from library.models.single_file import config_dir_for, text_encoder_names
    try:
        base = Path(model_dir) if Path(model_dir).is_dir() else \
            config_dir_for(family.name, model.model_config_dir)
        unet = json.loads((base / "unet" / "config.json").read_text())
        tes = [json.loads((base / n / "config.json").read_text())
               for n in text_encoder_names(family.name)]
    except Exception:  # unusual layouts: the model loader reports them itself
        return None
    return unet, tes


def rank_problems(cfg, model_dir: Path, family, net_args) -> list[str]:
    """network_dim / conv_dim above the largest rank any targeted layer can use."""
    found = _configs(cfg.model, model_dir, family)
    if found is None:
        return []
    unet, tes = found
    lo = cfg.lora
    widths = []
    if not lo.network_train_text_encoder_only:
        widths.append(max(unet.get("block_out_channels") or [0]))
    if not lo.network_train_unet_only:
        widths += [te.get("hidden_size", 0) for te in tes]
    problems = []
    limit = max(widths, default=0)
    if limit and lo.network_dim > limit and not lo.dim_from_weights:
        problems.append(f"network_dim = {lo.network_dim} is more than any layer of this model "
                        f"can use (the widest trained layer has {limit} features, so rank "
                        f"{limit} is already full rank); use at most {limit} (typical: 4 to "
                        "128)")
    conv = getattr(net_args, "conv_dim", None)
    conv_limit = max(unet.get("block_out_channels") or [0])
    if conv and conv_limit and conv > conv_limit and not lo.network_train_text_encoder_only:
        problems.append(f"network_args conv_dim = {conv} is more than any conv layer of this "
                        f"model can use ({conv_limit} output channels at most); use at most "
                        f"{conv_limit}")
    return problems
