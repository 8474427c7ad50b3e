"""Build the training run's LoRANetwork from the config, and start it from `network_weights`.

- `build_network`: targets from network_dim / network_alpha / network_args (kohya's defaults
  and per-block ranks), or, with `dim_from_weights`, the modules, ranks and alphas of the
  `network_weights` file (kohya's --dim_from_weights).
- `load_network_weights`: a kohya file (ours or anyone's) or a diffusers/peft file, loaded
  strictly: missing or unexpected modules and shape mismatches are an error naming the file.
  Modules of a component this run does not train (e.g. the text encoders with
  network_train_unet_only) are left out with a note.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from networks.from_file import read_kohya, targets_from_state_dict
from networks.lora import LoRANetwork
from networks.network_args import NetworkArgs, rank_spec
from networks.presets import Dims, preset_targets
from networks.targets import find_targets


def skipped_prefixes(cfg, family) -> tuple[str, ...]:
    """kohya key prefixes of the components this run does not train."""
    skip: tuple[str, ...] = ()
    if cfg.lora.network_train_unet_only:
        skip += tuple(f"{p}_" for p in family.te_prefixes)
    if cfg.lora.network_train_text_encoder_only:
        skip += ("lora_unet_",)
    return skip


def _drop(sd: Mapping, prefixes: tuple[str, ...]) -> tuple[dict, int]:
    kept = {k: v for k, v in sd.items() if not k.startswith(prefixes)}
    dropped = {k.split(".", 1)[0] for k in sd if k.startswith(prefixes)} if prefixes else set()
    return kept, len(dropped)


def build_network(c, family, cfg, args: NetworkArgs) -> LoRANetwork:
    """The (detached) network of a training run; ValueError names the problem."""
    lo = cfg.lora
    dropout = args.dropout if args.dropout is not None else (lo.network_dropout or 0.0)
    if args.spec.algo != "lora":  # LyCORIS applies dropout to LoRA/LoCon only
        dropout = 0.0
    dropouts = dict(dropout=dropout, rank_dropout=args.rank_dropout,
                    module_dropout=args.module_dropout, spec=args.spec)
    if lo.dim_from_weights:
        sd, _ = read_kohya(lo.network_weights, family.name, dict(c.unet.config))
        sd, _ = _drop(sd, skipped_prefixes(cfg, family))
        if not sd:
            raise ValueError(f"network_weights {lo.network_weights}: no modules for the "
                             "components this run trains (dim_from_weights)")
        try:
            targets = targets_from_state_dict(sd, c.unet, c.text_encoders, family.te_prefixes,
                                              family.name)
        except ValueError as e:
            raise ValueError(f"network_weights {lo.network_weights}: {e}") from None
        return LoRANetwork(targets, **dropouts)
    if args.preset is not None:  # lycoris.kohya: LyCORIS's defaults and preset targets
        dims = Dims(lo.network_dim, lo.network_alpha, args.conv_dim or lo.network_dim,
                    args.conv_alpha if args.conv_alpha is not None else lo.network_alpha)
        targets = preset_targets(args.preset, c.unet, c.text_encoders, family.te_prefixes,
                                 family.name, dims, args.spec,
                                 train_unet=not lo.network_train_text_encoder_only,
                                 train_text_encoder=not lo.network_train_unet_only)
        return LoRANetwork(targets, **dropouts)
    ranks = rank_spec(args, lo.network_dim, lo.network_alpha, family.name)
    targets = find_targets(c.unet, c.text_encoders, family.te_prefixes, family.name, ranks,
                           train_unet=not lo.network_train_text_encoder_only,
                           train_text_encoder=not lo.network_train_unet_only)
    return LoRANetwork(targets, **dropouts)


def load_network_weights(network: LoRANetwork, path: str | Path, family: str,
                         unet_config: Mapping, skip_prefixes: tuple[str, ...] = ()
                         ) -> list[str]:
    """Copy a LoRA file's weights (and alphas) into `network`; returns notes for the log.

    Strict: every module of the network must be in the file with the same shapes, and the
    file may hold nothing else (besides modules under `skip_prefixes`, which are left out).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"network_weights: {path} not found")
    sd, _ = read_kohya(path, family, unet_config)
    sd, dropped = _drop(sd, skip_prefixes)
    notes = [f"network_weights: {dropped} modules of components not trained in this run "
             f"({', '.join(p.rstrip('_') for p in skip_prefixes)}) left out"] if dropped else []
    try:
        network.load_kohya_state_dict(sd, source=f"network_weights {path}")
    except ValueError as e:
        raise ValueError(f"{e}. The file must have exactly this run's modules and ranks "
                         "(network_dim, network_args, network_train_*_only); or set "
                         "dim_from_weights = true to take them from the file") from None
    return notes + [f"network_weights: started from {path} ({len(network)} modules)"]
