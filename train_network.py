#!/usr/bin/env python
"""Train a LoRA for Stable Diffusion 1.5 / SDXL.

    python train_network.py --config_file configs/examples/tiny_demo.toml [--key value ...]

Reads top to bottom: config -> data (checked before any model loads) -> models -> LoRA ->
optimizer -> the loop -> save. Exit codes: 0 done, 2 bad config or data (nothing written),
1 failure during training (files already saved stay intact).
"""
from __future__ import annotations

import logging
import math
import random
import sys
import time
from pathlib import Path

import torch

from library.config import ConfigError, load_config
from library.config.output import config_to_toml, write_config_toml
from library.data.dataset import DataOptions, DataSet
from library.data.doctor import check_images, describe_plan
from library.data.sources import scan_sources
from library.models.loading import ModelLoadError, detect_family, load_components, \
    resolve_model_dir
from library.train.optimizers import make_optimizer
from library.train.sampling import Sampler, sample_prompts
from library.train.saving import build_metadata, save_lora
from library.train.schedulers import make_scheduler, warmup_steps
from library.train.step import LossSettings, diffusion_loss
from library.train.tracking import LossAverage, Tracker, run_dir
from networks.lora import LoRANetwork
from networks.targets import RankSpec, find_targets

log = logging.getLogger("tomlora")
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def fail(kind: str, problems: list[str]) -> int:
    print(f"\n{kind} ({len(problems)} problem{'s' * (len(problems) != 1)}); nothing was "
          "trained or written:", file=sys.stderr)
    for p in problems:
        print(f"  - {p}", file=sys.stderr)
    return 2


def output_paths(cfg) -> dict[str, Path]:
    out = Path(cfg.saving.output_dir)
    name = cfg.saving.output_name
    final = out / ("pytorch_lora_weights.safetensors" if cfg.saving.save_model_as ==
                   "diffusers" else f"{name}.safetensors")
    return {"dir": out, "final": final, "config": out / f"{name}.toml"}


def rank_spec(cfg) -> RankSpec:
    args = cfg.lora.network_args
    conv_dim = args.get("conv_dim")
    return RankSpec(cfg.lora.network_dim, cfg.lora.network_alpha,
                    int(conv_dim) if conv_dim else None,
                    float(args["conv_alpha"]) if args.get("conv_alpha") else None)


def param_groups(network: LoRANetwork, cfg) -> list[dict]:
    o = cfg.optimizer
    lrs = {"lora_unet": o.unet_lr or o.learning_rate}
    groups = []
    for part, modules in network.parts().items():
        lr = lrs.get(part, o.text_encoder_lr or o.learning_rate)
        groups.append({"params": [p for m in modules for p in m.parameters()], "lr": lr,
                       "name": part})
    return groups


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    # ---- 1. configuration ---------------------------------------------------------------
    try:
        loaded = load_config(sys.argv[1:] if argv is None else argv,
                             check_paths="--output_config" not in (argv or sys.argv))
    except ConfigError as e:
        return fail("Configuration error", e.problems)
    cfg = loaded.config
    for w in loaded.warnings:
        log.warning(w)
    if loaded.output_config:
        write_config_toml(cfg, Path(loaded.output_config))
        print(f"resolved config written to {loaded.output_config}")
        return 0

    # ---- 2. data, checked before any model loads ----------------------------------------
    try:
        model_dir = resolve_model_dir(cfg.model.pretrained_model_name_or_path)
        family = detect_family(model_dir, cfg.model.model_family)
    except ModelLoadError as e:
        return fail("Model error", [str(e)])
    d = cfg.dataset
    resolution = d.resolution or (family.native_resolution, family.native_resolution)
    scan = scan_sources(d.train_data_dir, d.reg_data_dir, caption_extension=d.caption_extension,
                        caption_column=d.caption_column, image_column=d.image_column)
    for w in scan.warnings:
        log.warning(w)
    items, bad = check_images(scan.items, skip_bad=d.skip_bad_images)
    if scan.problems or bad:
        return fail("Data error", scan.problems + bad)
    seed = cfg.training.seed if cfg.training.seed is not None else random.randrange(2**31)
    dataset = DataSet(items, DataOptions.from_config(d, resolution), seed)
    accum = cfg.training.gradient_accumulation_steps
    steps_per_epoch = math.ceil(dataset.steps_per_epoch() / accum)
    epochs = cfg.training.max_train_epochs
    total_steps = epochs * steps_per_epoch if epochs else (cfg.training.max_train_steps or 1600)
    print(describe_plan(scan, dataset, steps_per_epoch, total_steps, accum))
    try:  # sample prompt files are checked before any model loads (docs/SAMPLING.md)
        prompts = sample_prompts(cfg, family.native_resolution, seed)
    except ValueError as e:
        return fail("Sample prompt error", [str(e)])
    if cfg.training.dry_run:
        return 0
    paths = output_paths(cfg)
    if paths["final"].exists() and not cfg.saving.overwrite:
        return fail("Output error", [f"{paths['final']} exists; set overwrite = true or "
                                     "choose another output_name / output_dir"])

    # ---- 3. models ---------------------------------------------------------------------
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    mp = cfg.training.mixed_precision
    if mp != "no" and not torch.cuda.is_available():
        log.warning(f"mixed_precision = \"{mp}\" needs a CUDA GPU; training in fp32 on CPU")
        mp = "no"
    accelerator = Accelerator(mixed_precision=mp, gradient_accumulation_steps=accum)
    set_seed(seed)
    device, weight_dtype = accelerator.device, DTYPES[mp]
    vae_dtype = torch.float32 if (cfg.model.no_half_vae or family.name == "sdxl") \
        else weight_dtype
    c = load_components(str(model_dir), family=family.name, vae=cfg.model.vae,
                        weight_dtype=weight_dtype, vae_dtype=vae_dtype)
    for m in [c.unet, c.vae, *c.text_encoders]:
        m.requires_grad_(False).eval().to(device)
    if cfg.training.gradient_checkpointing:
        c.unet.enable_gradient_checkpointing()
        for te in c.text_encoders:
            te.gradient_checkpointing_enable()
    if cfg.model.sdpa:
        from diffusers.models.attention_processor import AttnProcessor2_0
        c.unet.set_attn_processor(AttnProcessor2_0())

    # ---- 4. the LoRA network, optimizer and schedule -------------------------------------
    train_te = not cfg.lora.network_train_unet_only
    train_unet = not cfg.lora.network_train_text_encoder_only
    args = cfg.lora.network_args
    network = LoRANetwork(
        find_targets(c.unet, c.text_encoders, family.te_prefixes, family.name, rank_spec(cfg),
                     train_unet=train_unet, train_text_encoder=train_te),
        dropout=cfg.lora.network_dropout or 0.0,
        rank_dropout=float(args.get("rank_dropout", 0.0)),
        module_dropout=float(args.get("module_dropout", 0.0))).to(device).attach()
    network.train()
    log.info(f"LoRA on {len(network)} modules: " + ", ".join(
        f"{k} {len(v)}" for k, v in network.parts().items()))
    optimizer = make_optimizer(cfg.optimizer.optimizer_type, param_groups(network, cfg),
                               cfg.optimizer.learning_rate, cfg.optimizer.optimizer_args)
    lr_scheduler = make_scheduler(
        cfg.optimizer.lr_scheduler, optimizer, total_steps=total_steps,
        warmup=warmup_steps(cfg.optimizer.lr_warmup_steps, total_steps),
        num_cycles=cfg.optimizer.lr_scheduler_num_cycles, power=cfg.optimizer.lr_scheduler_power)
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    params = [p for p in network.parameters() if p.requires_grad]

    # ---- 5. caches -----------------------------------------------------------------------
    scaling = c.vae.config.scaling_factor
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def encode_latents(px: torch.Tensor) -> torch.Tensor:
        dist = c.vae.encode(px.to(device, vae_dtype)).latent_dist
        return (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen).to(
            device, dist.mean.dtype)) * scaling

    if d.cache_latents:
        with torch.no_grad():
            dataset.cache_latents(encode_latents, d.vae_batch_size)
        log.info(f"cached {len(dataset.latent_cache)} latents")
    te_cache: dict[str, dict] = {}

    def conditioning(captions: list[str]) -> dict:
        if train_te:
            return family.encode_prompts(c, captions, cfg.model.clip_skip)
        missing = [t for t in dict.fromkeys(captions) if t not in te_cache]
        if missing:
            with torch.no_grad():
                enc = family.encode_prompts(c, missing, cfg.model.clip_skip)
            for i, t in enumerate(missing):
                te_cache[t] = {k: v[i] for k, v in enc.items() if v is not None}
        cond = {k: torch.stack([te_cache[t][k] for t in captions]) for k in te_cache[captions[0]]}
        if not d.cache_text_encoder_outputs:
            te_cache.clear()
        return cond

    # ---- 6. the loop ---------------------------------------------------------------------
    logging_dir = cfg.logging.logging_dir or str(paths["dir"] / "logs")
    tracker = Tracker(run_dir(logging_dir, cfg.saving.output_name, cfg.logging.log_prefix,
                              cfg.logging.log_tracker_name) if accelerator.is_main_process
                      else None, config_to_toml(cfg))
    loss_settings = LossSettings.from_config(cfg)
    loss_avg = LossAverage(steps_per_epoch)
    paths["dir"].mkdir(parents=True, exist_ok=True)
    write_config_toml(cfg, paths["config"])
    sampler = Sampler(c, family, network, cfg, paths["dir"], tracker, device, weight_dtype,
                      seed, prompts)

    def save(path: Path, step: int, epoch: int) -> None:
        if not accelerator.is_main_process:
            return
        meta = build_metadata(cfg, family, steps=step, epoch=epoch, num_images=len(items),
                              resolution=resolution, tag_frequency=scan_tag_frequency(items),
                              bucket_info=bucket_info(dataset), seed=seed, title=path.stem)
        save_lora(network, path, precision=cfg.saving.save_precision,
                  layout=cfg.saving.save_model_as, family=family.name,
                  unet_config=dict(c.unet.config), metadata=meta)
        log.info(f"saved {path}")

    from tqdm.auto import tqdm
    progress = tqdm(total=total_steps, desc="steps", disable=not accelerator.is_main_process)
    global_step, epoch, started = 0, 0, time.time()
    try:
        sampler.maybe_sample(0, 0, first=True)
        while global_step < total_steps:
            slot = 0
            for batch_indices in dataset.batches(epoch):
                batch = dataset.collate(batch_indices, epoch, slot)
                slot += len(batch_indices)
                with accelerator.accumulate(network):
                    with torch.no_grad():
                        latents = batch["latents"].to(device) if "latents" in batch else \
                            encode_latents(batch["pixels"])
                    with torch.set_grad_enabled(train_te):
                        cond = conditioning(batch["captions"])
                    loss = diffusion_loss(c.unet, family, c.noise_scheduler, latents, cond,
                                          batch, loss_settings, weight_dtype=weight_dtype,
                                          autocast=accelerator.autocast)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.optimizer.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, cfg.optimizer.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                if not accelerator.sync_gradients:
                    continue
                global_step += 1
                current = loss.detach().item()
                if not math.isfinite(current):
                    raise FloatingPointError(
                        f"loss is {current} at step {global_step}: lower learning_rate, or "
                        "use bf16 / no_half_vae if fp16 overflowed; files saved so far are "
                        "intact")
                average = loss_avg.add(current)
                lrs = {f"lr/{'unet' if g['name'] == 'lora_unet' else 'textencoder'}"
                       f"{'' if g['name'] in ('lora_unet', 'lora_te', 'lora_te1') else '2'}":
                       g["lr"] for g in optimizer.param_groups}
                tracker.scalars({"loss/current": current, "loss/average": average, **lrs},
                                global_step)
                progress.set_postfix(loss=f"{average:.4f}", lr=f"{next(iter(lrs.values())):.2e}")
                progress.update(1)
                sampler.maybe_sample(global_step, epoch + 1)
                every = cfg.saving.save_every_n_steps
                if every and global_step % every == 0 and global_step < total_steps:
                    save(paths["dir"] / f"{cfg.saving.output_name}-step{global_step:08d}"
                         ".safetensors", global_step, epoch + 1)
                if global_step >= total_steps:
                    break
            epoch += 1
            tracker.scalars({"loss/epoch": loss_avg.mean}, epoch)
            sampler.maybe_sample(global_step, epoch, epoch_end=True)
            every = cfg.saving.save_every_n_epochs
            if every and epoch % every == 0 and global_step < total_steps:
                save(paths["dir"] / f"{cfg.saving.output_name}-{epoch:06d}.safetensors",
                     global_step, epoch)
        save(paths["final"], global_step, epoch)
    except (FloatingPointError, RuntimeError) as e:
        log.error(f"training failed: {e}")
        return 1
    finally:
        progress.close()
        tracker.close()
    accelerator.wait_for_everyone()
    print(f"\ndone: {global_step} steps in {time.time() - started:.0f} s\n"
          f"  LoRA:        {paths['final']}\n  config:      {paths['config']}\n"
          f"  TensorBoard: tensorboard --logdir {logging_dir}")
    return 0


def scan_tag_frequency(items) -> dict:
    freq: dict[str, dict[str, int]] = {}
    for it in items:
        tags = freq.setdefault(it.folder, {})
        for tag in (t.strip() for t in it.caption.split(",")):
            if tag:
                tags[tag] = tags.get(tag, 0) + 1
    return freq


def bucket_info(dataset: DataSet) -> dict:
    counts: dict[str, int] = {}
    for b, n in zip(dataset.buckets, dataset.repeats):
        counts[f"{b[0]}x{b[1]}"] = counts.get(f"{b[0]}x{b[1]}", 0) + n
    return {"buckets": counts}


if __name__ == "__main__":
    sys.exit(main())
