"""Validation loss: deterministic, so curves from different runs and steps compare.

Each held-out image is scored at fixed timesteps with noise from a generator seeded by
(seed, image, timestep), on the centre crop, without caption augmentation, with the LoRA in
eval mode (no dropout). Nothing here draws from the global RNGs, so validating never changes
the training trajectory.
"""
from __future__ import annotations

import random

import torch

from library.train import noise as N
from library.train.speed import run_eagerly

VAL_TIMESTEPS = (100, 300, 500, 700, 900)


def split_items(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation) split of the distinct training images (never reg images),
    deterministic per seed; at least one image stays on each side."""
    train = [i for i in items if not i.is_reg]
    if fraction <= 0 or len(train) < 2:
        return items, []
    order = list(range(len(train)))
    random.Random(f"val:{seed}").shuffle(order)
    n_val = min(len(train) - 1, max(1, round(fraction * len(train))))
    val_idx = set(order[:n_val])
    val = [train[i] for i in sorted(val_idx)]
    keep = [it for it in items if it.is_reg or it not in val]
    return keep, val


def hold_out_for(training, seed: int):
    """The `build_group` hold-out of a run: per dataset, its dataset-TOML `validation_split`
    / `validation_seed` when set, else the [training] ones; the draw's seed is
    `validation_seed`, else the training seed (sd-scripts' rule)."""
    def hold_out(items: list, options) -> tuple[list, list]:
        split = options.validation_split
        vseed = options.validation_seed if options.validation_seed is not None \
            else training.validation_seed
        return split_items(items, training.validation_split if split is None else split,
                           seed if vseed is None else vseed)
    return hold_out


@torch.no_grad()
@run_eagerly  # compiled blocks (compile = true) run eagerly here
def validation_loss(val_set, *, unet, family, scheduler, encode_mean, conditioning, network,
                    seed: int, device, weight_dtype, autocast, v_prediction: bool) -> float:
    was_training = network.training
    multipliers = [(m, m.multiplier) for m in network]
    network.eval()
    network.set_multiplier(1.0)  # the LoRA as saved, whatever the last batch's dataset
    losses = []
    try:
        for idx in range(len(val_set.items)):
            batch = val_set.collate([idx], 0, 0)
            latents = (batch["latents"].to(device) if "latents" in batch
                       else encode_mean(batch["pixels"])).to(weight_dtype)
            cond = conditioning(batch["captions"])
            for t_val in VAL_TIMESTEPS:
                g = torch.Generator().manual_seed(hash((seed, idx, t_val)) % (2**63))
                noise = torch.randn(latents.shape, generator=g).to(device, latents.dtype)
                t = torch.full((latents.shape[0],), t_val, device=device, dtype=torch.long)
                noisy = scheduler.add_noise(latents, noise, t)
                with autocast():
                    pred = unet(noisy, t, cond["encoder_hidden_states"].to(weight_dtype),
                                **family.unet_inputs(cond, batch)).sample
                target = N.training_target(scheduler, latents, noise, t, v_prediction)
                losses.append(N.per_sample_loss(pred, target).mean())
    finally:
        network.train(was_training)
        for m, multiplier in multipliers:
            m.multiplier = multiplier
    return float(torch.stack(losses).mean()) if losses else float("nan")
