"""Optimizer parameter groups of a LoRANetwork, with kohya's learning-rate rules.

- UNet modules train at `unet_lr`, text-encoder modules at `text_encoder_lr` (SDXL: one value
  for both encoders, or one per encoder), each defaulting to `learning_rate`.
- Block lr weights (`down_lr_weight` / `mid_lr_weight` / `up_lr_weight`) multiply the UNet lr
  per kohya block; the UNet gets one group per block then, as in sd-scripts.
- LoRA+ (Hayou et al. 2024, arXiv:2402.12354): lora_up trains at lr x ratio, in its own group.
- A group whose lr is 0 is left out and its parameters frozen (requires_grad False), so the
  module keeps its loaded or initial weights.

Group names start with the part ("lora_unet", "lora_te1", ...), then "/blockNN" and "/plus"
where they apply; library.train.tracking maps them to lr/unet, lr/textencoder... tags.
"""
from __future__ import annotations

from typing import Mapping

from networks import formats
from networks.lora import LoRANetwork
from networks.network_args import NetworkArgs, NetworkArgsError, parse_network_args

TE_PREFIXES = {"sd15": ("lora_te",), "sdxl": ("lora_te1", "lora_te2")}


def text_encoder_lrs(value, default: float, family: str) -> dict[str, float]:
    """Learning rate per text-encoder prefix; `value` is None, one number or a list."""
    prefixes = TE_PREFIXES[family]
    if value is None:
        return {p: default for p in prefixes}
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values or len(values) > len(prefixes):
        raise ValueError(f"[optimizer] text_encoder_lr: {len(values)} values given but "
                         f"{family} has {len(prefixes)} text encoder(s); give "
                         + ("one value" if len(prefixes) == 1 else
                            "one value for both or two (TE1, TE2)"))
    # kohya: one value applies to every encoder
    return {p: float(values[min(i, len(values) - 1)]) for i, p in enumerate(prefixes)}


def _split(modules, lr: float, ratio: float | None, name: str) -> list[dict]:
    """One group for the modules, or two (down / up at lr x ratio) with LoRA+."""
    if ratio is None:
        return [{"params": [p for m in modules for p in m.parameters()], "lr": lr,
                 "name": name}]
    # LyCORIS's rule: the up side is lora_up (LoRA/LoCon); other algorithms have none, so
    # all their parameters stay in the base group.
    down = [p for m in modules for n, p in m.named_parameters()
            if not n.startswith(m.plus_names or ("\0",))]
    up = [p for m in modules for n, p in m.named_parameters()
          if m.plus_names and n.startswith(m.plus_names)]
    if not up:
        return [{"params": down, "lr": lr, "name": name}]
    return [{"params": down, "lr": lr, "name": name},
            {"params": up, "lr": lr * ratio, "name": f"{name}/plus"}]


def param_groups(network: LoRANetwork, cfg, family: str, unet_config: Mapping,
                 args: NetworkArgs | None = None) -> list[dict]:
    """Parameter groups for the optimizer (see the module doc). ValueError when every lr is 0."""
    o = cfg.optimizer
    if args is None:
        args = parse_network_args(with_top_level_keys(cfg.lora), family,
                                  cfg.lora.network_module, cfg.lora.network_type)
    unet_lr = o.unet_lr if o.unet_lr is not None else o.learning_rate
    te_lrs = text_encoder_lrs(o.text_encoder_lr, o.learning_rate, family)
    groups: list[dict] = []
    for part, mods in network.parts().items():
        if part != "lora_unet":
            groups += _split(mods, te_lrs.get(part, o.learning_rate),
                             args.loraplus_text_encoder, part)
        elif args.lr_weights is None:
            groups += _split(mods, unet_lr, args.loraplus_unet, part)
        else:
            by_block: dict[int, list] = {}
            for m in mods:
                block = formats.lora_block_index(m.lora_name, family, unet_config)
                by_block.setdefault(block, []).append(m)
            for block in sorted(by_block):
                weight = args.lr_weights[block] if block >= 0 else 1.0
                groups += _split(by_block[block], unet_lr * weight, args.loraplus_unet,
                                 f"{part}/block{block:02d}")
    kept = []
    for g in groups:
        if g["lr"] == 0:
            for p in g["params"]:
                p.requires_grad_(False)
        elif g["params"]:
            kept.append(g)
    if not kept:
        raise ValueError("every learning rate is 0 (unet_lr, text_encoder_lr, block lr "
                         "weights): nothing would train")
    return kept


TOP_LEVEL_NETWORK_ARGS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio",
                          "loraplus_text_encoder_lr_ratio")


def with_top_level_keys(lora_cfg) -> dict:
    """network_args plus the [lora] keys kohya also takes as top-level flags (LoRA+); the
    top-level value wins, as in kohya's train_network.py."""
    top = {k: getattr(lora_cfg, k) for k in TOP_LEVEL_NETWORK_ARGS
           if getattr(lora_cfg, k) is not None}
    return {**lora_cfg.network_args, **top}


def check_config(cfg, family: str) -> NetworkArgs:
    """The run's network_args, typed, and its text_encoder_lr checked against the family;
    NetworkArgsError lists every problem (before any model loads)."""
    problems = []
    try:
        args = parse_network_args(with_top_level_keys(cfg.lora), family,
                                  cfg.lora.network_module, cfg.lora.network_type)
    except NetworkArgsError as e:
        problems += e.problems
    try:
        text_encoder_lrs(cfg.optimizer.text_encoder_lr, cfg.optimizer.learning_rate, family)
    except ValueError as e:
        problems.append(str(e))
    if not problems and cfg.saving.save_model_as == "diffusers" and \
            (args.spec.algo != "lora" or args.spec.dora or args.spec.use_tucker):
        problems.append("[saving] save_model_as = \"diffusers\": diffusers loads plain LoRA "
                        "only, not this network (LoHa/LoKr/full/(IA)3, DoRA or Tucker); save "
                        "as safetensors and export with tools/convert_lora.py --to lora "
                        "--rank N")
    if problems:
        raise NetworkArgsError(problems)
    return args
