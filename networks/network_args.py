"""`network_args` of `networks.lora`, typed and checked with kohya's meaning.

kohya passes network_args as untyped strings (`"block_dims=2,4,4,..."`); our config loader
already turns `k=v` strings and TOML tables into Python values, so a list may arrive as a
TOML array or as one comma-separated string. Everything is checked here, before any model
loads, and every problem is reported at once naming `network_args`, the key and the fix.

Per-block lists follow sd-scripts `networks/lora.py` (create_network, get_block_dims_and_alphas,
get_block_lr_weight): 25 blocks for SD1.5 (IN00..IN11, MID, OUT00..OUT11) and 23 for SDXL
(BASE, IN00..IN08, MID0..2, OUT00..OUT08, OUT); `down_lr_weight` / `up_lr_weight` have 12 (SD1.5)
or 9 (SDXL) entries or a preset name, `mid_lr_weight` 1 or 3. Blocks whose lr weight is 0 get
no LoRA modules at all (kohya's remove_block_dims_and_alphas).
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from networks.adapters import canonical
from networks.adapters.base import AdapterSpec
from networks.targets import RankSpec

# Length of the per-block lists (block_dims ...) and of the down/up and mid lr-weight lists.
BLOCK_COUNTS = {"sd15": 25, "sdxl": 23}
DOWN_UP_COUNTS = {"sd15": 12, "sdxl": 9}
MID_COUNTS = {"sd15": 1, "sdxl": 3}
LR_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")

KEYS = {
    "conv_dim": "rank of the 3x3 convs (LoCon); enables ResNet and sampler targets",
    "conv_alpha": "alpha of the 3x3 convs (default conv_dim)",
    "rank_dropout": "probability of dropping each rank of the down output (training only)",
    "module_dropout": "probability of skipping a whole LoRA module per step (training only)",
    "block_dims": "rank per UNet block (25 values SD1.5, 23 SDXL)",
    "block_alphas": "alpha per UNet block",
    "conv_block_dims": "3x3-conv rank per UNet block",
    "conv_block_alphas": "3x3-conv alpha per UNet block",
    "down_lr_weight": "lr weight per down block, or a preset (cosine, sine, linear, "
                      "reverse_linear, zeros, optionally +offset)",
    "mid_lr_weight": "lr weight of the mid block(s)",
    "up_lr_weight": "lr weight per up block, or a preset",
    "block_lr_zero_threshold": "lr weights at or below this become 0 (block not trained)",
    "loraplus_lr_ratio": "LoRA+: lora_up learning rate = lr x ratio",
    "loraplus_unet_lr_ratio": "LoRA+ ratio for the UNet only",
    "loraplus_text_encoder_lr_ratio": "LoRA+ ratio for the text encoders only",
}
# LyCORIS's options (lycoris/kohya.py create_network), read with either network_module.
ADAPTER_KEYS = {
    "use_tucker": "Tucker/CP core for k x k convs (lora_mid, hada_t1/t2, lokr_t2)",
    "use_cp": "old name of use_tucker", "use_conv_cp": "old name of use_tucker",
    "disable_conv_cp": "false = use_tucker (old LyCORIS spelling)",
    "use_scalar": "a trained scalar on the delta, initialised at 0",
    "dora_wd": "DoRA: weight decomposition with a trained magnitude (dora_scale)",
    "wd_on_output": "DoRA magnitude per output row (true, default) or per input column",
    "factor": "LoKr: split dims around this factor (-1: nearest to the square root)",
    "decompose_both": "LoKr: low-rank w1 as well as w2",
    "full_matrix": "LoKr: full w1 and w2 (no rank, no alpha)",
    "unbalanced_factorization": "LoKr: swap the out-dim split",
    "rank_dropout_scale": "rescale the kept rows under rank_dropout",
    "rs_lora": "rank-stabilised scale alpha / sqrt(rank)",
    "bypass_mode": "accepted, no effect (the same math either way)",
    "train_norm": "LyCORIS norm adapters: only false is supported",
}
# Keys only lycoris.kohya reads.
LYCORIS_KEYS = {
    "algo": "lora/locon, loha, lokr, full, ia3",
    "preset": "target modules: full, full-lin, attn-mlp, attn-only, unet-only, "
              "unet-transformer-only, unet-convblock-only, ia3",
    "dropout": "dropout on the LoRA down output (as network_dropout)",
}
# lycoris.kohya reads these, but not for any algorithm we build.
_OFT_ONLY = ("constraint", "rescaled", "block_size")
_KOHYA_ONLY = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas",
               "down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold")
NETWORK_MODULES = ("networks.lora", "lycoris.kohya")
# Keys users bring from other trainers, with where they belong instead.
_ELSEWHERE = {
    "dropout": "use the [lora] key network_dropout",
    "algo": "set network_module = \"lycoris.kohya\" for LyCORIS's algo=, or network_type "
            "in [lora]",
    "preset": "LyCORIS presets need network_module = \"lycoris.kohya\"; with networks.lora "
              "conv_dim enables the ResNet targets",
}


class NetworkArgsError(ValueError):
    """Bad network_args: every problem, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class NetworkArgs:
    conv_dim: int | None = None
    conv_alpha: float | None = None
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    block_dims: tuple[int, ...] | None = None
    block_alphas: tuple[float, ...] | None = None
    conv_block_dims: tuple[int, ...] | None = None
    conv_block_alphas: tuple[float, ...] | None = None
    # Full per-block lr weights (25 / 23 values), None when no lr weight was given.
    lr_weights: tuple[float, ...] | None = None
    loraplus_unet: float | None = None
    loraplus_text_encoder: float | None = None
    # The adapter: algorithm and options (networks.adapters), LyCORIS's preset (None: kohya's
    # targets of networks.lora) and LyCORIS's `dropout` key.
    spec: AdapterSpec = AdapterSpec()
    preset: str | None = None
    dropout: float | None = None
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def per_block(self) -> bool:
        return any(v is not None for v in (self.block_dims, self.block_alphas,
                                            self.conv_block_dims, self.conv_block_alphas,
                                            self.lr_weights))


def _numbers(value: Any, kind: type, key: str, empty_as: float | None = None) -> list:
    """A TOML array, a single number or a comma-separated string -> list of `kind`."""
    if isinstance(value, bool):
        raise ValueError(f"expected numbers, got {value!r}")
    if isinstance(value, (int, float)):
        items = [value]
    elif isinstance(value, str):
        items = [s.strip() for s in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError(f"expected a list of numbers, got {value!r}")
    out = []
    for item in items:
        if item == "" and empty_as is not None:  # kohya: "1,,1" leaves a block at 0
            out.append(kind(empty_as))
            continue
        try:
            number = float(item)
        except (TypeError, ValueError):
            raise ValueError(f"{item!r} is not a number") from None
        if kind is int and not number.is_integer():
            raise ValueError(f"{item!r} is not a whole number")
        out.append(kind(number))
    return out


def _preset(name: str, n: int) -> list[float]:
    """kohya's lr-weight presets over n blocks, shallow to deep, with an optional `+offset`."""
    base, _, offset = name.partition("+")
    add = float(offset) if offset else 0.0
    ramp = [i / (n - 1) for i in range(n)]
    curves = {
        "sine": [math.sin(math.pi * r / 2) for r in ramp],
        "cosine": [math.sin(math.pi * r / 2) for r in reversed(ramp)],
        "linear": ramp,
        "reverse_linear": list(reversed(ramp)),
        "zeros": [0.0] * n,
    }
    if base not in curves:
        raise ValueError(f"unknown preset {base!r}; valid presets: {', '.join(LR_PRESETS)} "
                         "(optionally with +offset, e.g. sine+0.5), or a list of numbers")
    return [v + add for v in curves[base]]


def parse_network_args(raw: Mapping[str, Any], family: str | None,
                       module: str = "networks.lora", network_type: str | None = None
                       ) -> NetworkArgs:
    """Typed network_args; NetworkArgsError lists every problem. `family` ("sd15"/"sdxl")
    decides the lengths of the per-block lists; None skips those length checks. `module` is
    network_module ("networks.lora" or "lycoris.kohya"), `network_type` the [lora] key."""
    problems: list[str] = []
    warnings: list[str] = []
    out: dict[str, Any] = {}
    lycoris = module == "lycoris.kohya"
    if lycoris:
        valid = {k: v for k, v in KEYS.items() if k not in _KOHYA_ONLY}
        valid.update(LYCORIS_KEYS)
    else:
        valid = dict(KEYS)
    valid.update(ADAPTER_KEYS)

    def bad(key: str, why: str) -> None:
        problems.append(f"[lora] network_args: {key}: {why}")

    for key in raw:
        if key in valid:
            continue
        if lycoris and key in _KOHYA_ONLY:
            bad(key, "a networks.lora (kohya per-block) arg; LyCORIS's network does not "
                "read it: remove it or use network_module = \"networks.lora\"")
            continue
        if key in _OFT_ONLY:
            if raw[key] not in (None, False, 0, "0", "false", "False"):
                bad(key, "only LyCORIS's OFT/BOFT read it, and those algorithms are not "
                    "supported; remove it")
            continue
        hint = None if lycoris else _ELSEWHERE.get(key)
        close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
        hint = hint or (f"did you mean {close[0]}?" if close else None)
        problems.append(f"[lora] network_args: unknown key {key!r}"
                        + (f" ({hint})" if hint else "")
                        + f"; valid keys for {module}: {', '.join(valid)}")

    if lycoris:  # reported above; not parsed again
        raw = {k: v for k, v in raw.items() if k not in _KOHYA_ONLY}

    def number(key: str, *, minimum: float, below: float | None = None, integer=False):
        if raw.get(key) is None:
            return None
        try:
            values = _numbers(raw[key], int if integer else float, key)
        except ValueError as e:
            bad(key, f"{e}; expected one number")
            return None
        if len(values) != 1:
            bad(key, f"expected one number, got {raw[key]!r}")
            return None
        v = values[0]
        if v < minimum or (below is not None and v >= below):
            rng = f">= {minimum:g}" + (f" and < {below:g}" if below is not None else "")
            bad(key, f"{v!r} out of range; it must be {rng}")
            return None
        return v

    out["conv_dim"] = number("conv_dim", minimum=0, integer=True) or None
    conv_alpha = number("conv_alpha", minimum=0)
    if conv_alpha == 0 and not lycoris:  # LyCORIS reads 0 as "network_alpha"
        bad("conv_alpha", "0 is ambiguous (kohya reads it as rank, other loaders as no "
            "effect); leave it unset for alpha = conv_dim")
    out["conv_alpha"] = conv_alpha or None
    out["rank_dropout"] = number("rank_dropout", minimum=0, below=1) or 0.0
    out["module_dropout"] = number("module_dropout", minimum=0, below=1) or 0.0
    for key in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
        v = number(key, minimum=0)
        if v == 0:
            bad(key, "a ratio of 0 would freeze lora_up; leave it unset for plain LoRA")
        out[key] = v or None
    threshold = number("block_lr_zero_threshold", minimum=0) or 0.0

    n = BLOCK_COUNTS.get(family) if family else None
    for key, kind in (("block_dims", int), ("block_alphas", float), ("conv_block_dims", int),
                      ("conv_block_alphas", float)):
        out[key] = None
        if raw.get(key) is None:
            continue
        try:
            values = _numbers(raw[key], kind, key)
        except ValueError as e:
            bad(key, f"{e}; expected {'whole ' if kind is int else ''}numbers separated by "
                "commas")
            continue
        if n is not None and len(values) != n:
            bad(key, f"has {len(values)} values; {family} needs {n} (kohya's block order: "
                + ("IN00..IN11, MID, OUT00..OUT11)" if family == "sd15" else
                   "BASE, IN00..IN08, MID0..MID2, OUT00..OUT08, OUT)"))
            continue
        if kind is int and any(v < 0 for v in values):
            bad(key, "ranks must be >= 0 (0 = no LoRA in that block)")
        elif kind is float and any(v <= 0 for v in values):
            bad(key, "alphas must be > 0")
        out[key] = tuple(values)

    lr_weights = _lr_weights(raw, family, threshold, bad, warnings)
    spec, preset, dropout = _adapter(raw, lycoris, network_type, bad, warnings, number)
    if problems:
        raise NetworkArgsError(problems)
    return NetworkArgs(
        spec=spec, preset=preset, dropout=dropout, conv_dim=out["conv_dim"], conv_alpha=out["conv_alpha"],
        rank_dropout=out["rank_dropout"], module_dropout=out["module_dropout"],
        block_dims=out["block_dims"], block_alphas=out["block_alphas"],
        conv_block_dims=out["conv_block_dims"], conv_block_alphas=out["conv_block_alphas"],
        lr_weights=lr_weights,
        loraplus_unet=out["loraplus_unet_lr_ratio"] or out["loraplus_lr_ratio"],
        loraplus_text_encoder=out["loraplus_text_encoder_lr_ratio"] or out["loraplus_lr_ratio"],
        warnings=tuple(warnings))


def _flag(raw, key, bad, default=False) -> bool:
    v = raw.get(key)
    if v is None:
        return default
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "1", "0"):
        return v.strip().lower() in ("true", "1")
    bad(key, f"expected true or false, got {v!r}")
    return default


def _adapter(raw, lycoris, network_type, bad, warnings, number):
    """(AdapterSpec, preset, dropout) from LyCORIS's keys (its defaults: algo lora, preset
    full with lycoris.kohya)."""
    from networks.presets import PRESETS
    algo = "lora"
    given = raw.get("algo") if lycoris else None
    for key, value in (("algo", given), ("network_type", network_type)):
        if value is None:
            continue
        try:
            name = canonical(value)
        except ValueError as e:
            bad(key, str(e))
            continue
        if key == "network_type" and given is not None and name != algo:
            bad("algo", f"algo={given} contradicts [lora] network_type = {network_type!r}; "
                "give one of them")
        algo = name
    preset = None
    if lycoris:
        preset = str(raw.get("preset") or "full")
        if preset not in PRESETS:
            bad("preset", f"unknown preset {preset!r} (preset files are not supported); "
                f"valid: {', '.join(PRESETS)}")
            preset = "full"
    elif raw.get("preset") is not None:
        bad("preset", "needs network_module = \"lycoris.kohya\"")
    tucker = _flag(raw, "use_tucker", bad) or _flag(raw, "use_cp", bad) or \
        _flag(raw, "use_conv_cp", bad) or not _flag(raw, "disable_conv_cp", bad, True)
    dora = _flag(raw, "dora_wd", bad)
    if dora and algo in ("full", "ia3"):
        bad("dora_wd", f"DoRA applies to lora/locon, loha and lokr, not algo={algo}")
    if _flag(raw, "train_norm", bad):
        bad("train_norm", "LyCORIS's norm adapters are not supported; set train_norm=false")
    if _flag(raw, "bypass_mode", bad):
        warnings.append("network_args: bypass_mode has no effect here (the adapters compute "
                        "the same delta either way)")
    factor = number("factor", minimum=-1, integer=True)
    if factor == 0:
        bad("factor", "0 is not a factor; use -1 (square root) or a positive number")
    spec = AdapterSpec(
        algo=algo, use_tucker=tucker, use_scalar=_flag(raw, "use_scalar", bad), dora=dora,
        dora_on_out=_flag(raw, "wd_on_output", bad, True),
        rank_dropout_scale=_flag(raw, "rank_dropout_scale", bad),
        rs_lora=_flag(raw, "rs_lora", bad), factor=int(factor if factor else -1),
        decompose_both=_flag(raw, "decompose_both", bad),
        full_matrix=_flag(raw, "full_matrix", bad),
        unbalanced_factorization=_flag(raw, "unbalanced_factorization", bad))
    dropout = number("dropout", minimum=0, below=1) if lycoris else None
    if algo != "lora" and dropout:
        warnings.append(f"network_args: dropout has no effect with algo={algo} (LyCORIS "
                        "applies it to LoRA/LoCon only)")
    return spec, preset, dropout


def _lr_weights(raw, family, threshold, bad, warnings) -> tuple[float, ...] | None:
    """kohya's block lr weights as one list indexed by block (None when none was given)."""
    keys = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
    if all(raw.get(k) is None for k in keys):
        return None
    if family is None:  # lengths depend on the family; checked again once it is known
        for key in keys:
            v = raw.get(key)
            if v is not None and not (isinstance(v, str) and v.split("+")[0] in LR_PRESETS):
                try:
                    _numbers(v, float, key, empty_as=0.0)
                except ValueError as e:
                    bad(key, str(e))
        return None
    lists = {}
    for key, n in (("down_lr_weight", DOWN_UP_COUNTS[family]), ("mid_lr_weight",
                   MID_COUNTS[family]), ("up_lr_weight", DOWN_UP_COUNTS[family])):
        v = raw.get(key)
        if v is None:
            lists[key] = [1.0] * n
            continue
        try:
            if isinstance(v, str) and "," not in v and key != "mid_lr_weight" and \
                    not _is_number(v):
                values = _preset(v.strip(), n)
            else:
                values = _numbers(v, float, key, empty_as=0.0)
        except ValueError as e:
            bad(key, str(e))
            continue
        if len(values) > n:
            bad(key, f"has {len(values)} values; {family} has {n} "
                f"{'mid' if key == 'mid_lr_weight' else key.split('_')[0]} blocks")
            continue
        if len(values) < n:  # kohya fills the deeper blocks with 1
            warnings.append(f"network_args: {key} has {len(values)} of {n} values; the "
                            "rest are 1.0")
            values = values + [1.0] * (n - len(values))
        if any(w < 0 for w in values):
            bad(key, "lr weights must be >= 0")
            continue
        lists[key] = [w if w > threshold else 0.0 for w in values]
    if len(lists) != 3:
        return None
    weights = lists["down_lr_weight"] + lists["mid_lr_weight"] + lists["up_lr_weight"]
    if family == "sdxl":  # BASE (time/label embeddings) and OUT are never weighted
        weights = [1.0] + weights + [1.0]
    return tuple(weights)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def rank_spec(args: NetworkArgs, network_dim: int, network_alpha: float | None,
              family: str) -> RankSpec:
    """Ranks and alphas of every target: per block when any per-block key is set.

    Unset alphas mean alpha = rank (our convention for network_alpha, applied per block).
    A block whose lr weight is 0 gets rank 0: no modules there (kohya does the same).
    """
    if not args.per_block:
        return RankSpec(network_dim, network_alpha, args.conv_dim, args.conv_alpha)
    n = BLOCK_COUNTS[family]
    dims = list(args.block_dims or [network_dim] * n)
    alphas = args.block_alphas or (network_alpha,) * n
    conv_dims = list(args.conv_block_dims) if args.conv_block_dims else \
        ([args.conv_dim] * n if args.conv_dim else None)
    conv_alphas = args.conv_block_alphas or (args.conv_alpha,) * n
    if args.lr_weights is not None:
        for i, w in enumerate(args.lr_weights):
            if w == 0:
                dims[i] = 0
                if conv_dims is not None:
                    conv_dims[i] = 0
    return RankSpec(network_dim, network_alpha, args.conv_dim, args.conv_alpha,
                    block_dims=tuple(dims), block_alphas=tuple(alphas),
                    conv_block_dims=tuple(conv_dims) if conv_dims is not None else None,
                    conv_block_alphas=tuple(conv_alphas) if conv_dims is not None else None)
