#!/usr/bin/env python
"""Train a LoRA for Stable Diffusion 1.5 / SDXL.

    python train_network.py --config_file configs/examples/tiny_demo.toml [--key value ...]

Reads top to bottom: config -> data (checked before any model loads) -> models -> LoRA ->
optimizer -> the loop -> save. Exit codes: 0 done, 2 bad config or data (nothing written),
1 failure during training (files already saved stay intact), 130 / 143 after Ctrl-C / SIGTERM
(the LoRA and state saved at the step where it stopped).
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import torch

from library.config import ConfigError, family_problems, load_config
from library.config.output import config_to_dict, config_to_toml, write_config_toml
from library.data.auto_cache import cache_latents_for_run, cache_text_for_run
from library.data.cache import cache_latents
from library.data.doctor import describe_plan
from library.data.prepare import build_group, prepare_data, validation_set
from library.data.text_cache import cache_text_encoder_outputs, static_captions, \
    text_cache_folder
from library.models.attention import configure_attention_and_storage
from library.models.loading import ModelLoadError, check_model, load_components_for
from library.models.text_encoding import truncation_note
from library.train.optimizers import make_optimizer
from library.train.sampling import Sampler, sample_prompts
from library.train.checkpoints import Checkpointer, existing_saves
from library.train.conditioning import LatentEncoder, TextConditioner
from library.train.distributed import average_gradients, loss_share, shard
from library.train.ema import make_ema
from library.train.saving import bucket_info, build_metadata, config_json, fingerprint, \
    save_lora, tag_frequency
from library.train.noise import apply_zero_terminal_snr
from library.train.preservation import class_prompts, make_preservation
from library.train.schedulers import scheduler_from_config
from library.train.fast_path import fast_path
from library.train.speed import step_begin
from library.train.step import LossSettings, batch_to_device, diffusion_loss, \
    set_batch_multiplier
from library.train.interrupt import GracefulStop, run_main
from library.train.preflight import preflight_problems
from library.train.run_lock import LockError, claim_output_dir
from library.train.state import Position, StateError, load_state, read_position, \
    resolve_resume, resume_warning, save_state, start_position
from library.train.tracking import LossAverage, Tracker, lr_scalars, run_dir, step_scalars
from library.train.validation import hold_out_for, validation_loss
from networks.build import build_network, load_network_weights, skipped_prefixes
from networks.max_norm import apply_max_norm
from networks.param_groups import check_config, param_groups

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


def trajectory_config(cfg):
    """The config without the keys that cannot change the training trajectory (where and how
    often files are saved, resume itself, logging, sampling): what a state's fingerprint
    covers, so resuming (which sets `resume`) from an unchanged config matches."""
    return replace(cfg, saving=type(cfg.saving)(), logging=type(cfg.logging)(),
                   sample=type(cfg.sample)())


def patch_scaler_for_fp16_weights(scaler) -> None:
    """full_fp16: torch's GradScaler refuses to unscale fp16 gradients; allow it (kohya's
    patch_accelerator_for_fp16_training)."""
    unscale = scaler._unscale_grads_
    scaler._unscale_grads_ = lambda optimizer, inv_scale, found_inf, allow_fp16: unscale(
        optimizer, inv_scale, found_inf, True)


def main(argv: list[str] | None = None) -> int:
    with ExitStack() as cleanup:  # releases the output_dir lock on every way out
        return train(argv, cleanup)


def train(argv: list[str] | None, cleanup: ExitStack) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    # ---- 1. configuration ---------------------------------------------------------------
    argv = sys.argv[1:] if argv is None else argv
    writes_config_only = any(a.split("=", 1)[0] == "--output_config" for a in argv)
    try:  # --output_config only resolves the config: the paths in it need not exist yet
        loaded = load_config(argv, check_paths=not writes_config_only)
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
        model_dir, family = check_model(cfg.model)  # path, family, single-file configs
    except ModelLoadError as e:
        return fail("Model error", [str(e)])
    try:  # network_args and text_encoder_lr depend on the family (block counts, encoders)
        net_args = check_config(cfg, family.name)
    except ValueError as e:
        return fail("Configuration error", e.problems)
    problems = family_problems(cfg, family.name, model_dir if model_dir.is_dir() else None)
    if problems:  # e.g. bucket steps this model cannot use
        return fail("Configuration error", problems)
    for w in net_args.warnings:
        log.warning(w)
    d = cfg.dataset
    resolution = d.resolution or (family.native_resolution, family.native_resolution)
    try:  # scan + the doctor (docs/DATASETS.md); a bad dataset_config is a config error
        data = prepare_data(d, resolution, loaded.cli_keys)
    except ConfigError as e:
        return fail("Configuration error", e.problems)
    for w in data.warnings:
        log.warning(w)
    if data.problems:
        return fail("Data error", data.problems)
    seed = cfg.training.seed if cfg.training.seed is not None else random.randrange(2**31)
    traj = trajectory_config(cfg)
    state_fp, state_cfg = fingerprint(traj), json.loads(config_json(traj))
    try:  # a resumed run must see the same data order, hence the same seed
        cfg, notes = resolve_resume(cfg)  # resume = "latest": the newest complete state
        for note in notes:
            log.warning(note)
        if cfg.saving.resume:
            seed = read_position(Path(cfg.saving.resume))[0].seed
            changed = resume_warning(Path(cfg.saving.resume), state_fp, state_cfg)
            if changed:
                log.warning(changed)
    except StateError as e:
        return fail("Resume error", [str(e)])
    world = int(os.environ.get("WORLD_SIZE", "1"))  # accelerate launch --num_processes
    dataset, val_items = build_group(data, seed, world=world,
                                     hold_out=hold_out_for(cfg.training, seed))
    items = dataset.items
    if cfg.training.validation_data_dir:
        val = prepare_data(replace(d, train_data_dir=cfg.training.validation_data_dir,
                                   reg_data_dir=None, dataset_config=None, subsets=[]),
                           resolution)
        if val.problems:
            return fail("Validation data error", val.problems)
        val_items = val.items
    val_set = validation_set(val_items, dataset.o, seed) if val_items else None
    accum = cfg.training.gradient_accumulation_steps
    steps_per_epoch = math.ceil(dataset.steps_per_epoch() / accum)
    epochs = cfg.training.max_train_epochs
    total_steps = epochs * steps_per_epoch if epochs else (cfg.training.max_train_steps or 1600)
    print(describe_plan(data, dataset, steps_per_epoch, total_steps, accum))
    try:  # sample prompt files are checked before any model loads (docs/SAMPLING.md)
        prompts = sample_prompts(cfg, family.native_resolution, seed)
    except ValueError as e:
        return fail("Sample prompt error", [str(e)])
    try:  # initial_step / initial_epoch
        start = start_position(cfg.training, seed, steps_per_epoch, accum, total_steps)
    except ValueError as e:
        return fail("Configuration error", [str(e)])
    try:  # preservation_weight: trigger and class from the folder names (docs/TRAINING.md)
        preservation_prompts = class_prompts(cfg.training, items)
    except ValueError as e:
        return fail("Configuration error", [str(e)])
    problems = preflight_problems(cfg, model_dir, family, net_args)  # outputs, ranks, files
    if problems:  # found here, not after the model load and the caches
        return fail("Configuration error", problems)
    if cfg.training.dry_run:
        return 0
    paths = output_paths(cfg)
    try:  # one run per output_dir (a lock); also proves the folder can be written
        for note in claim_output_dir(paths["dir"], cleanup):
            log.warning(note)  # a stale lock taken over, temporary files removed
    except LockError as e:
        return fail("Output error", [str(e)])
    if paths["final"].exists() and not cfg.saving.overwrite:
        return fail("Output error", [f"{paths['final']} exists; set overwrite = true or "
                                     "choose another output_name / output_dir"])
    earlier = [] if cfg.saving.overwrite or cfg.saving.resume else \
        existing_saves(paths["dir"], cfg.saving.output_name)
    if earlier:  # a new run would replace them or mix its saves with an older run's
        shown = ", ".join(p.name for p in earlier[:3]) + (", ..." if len(earlier) > 3 else "")
        return fail("Output error", [
            f"{paths['dir']} holds {len(earlier)} save{'s' * (len(earlier) != 1)} of an "
            f"earlier run named {cfg.saving.output_name!r} ({shown}); set overwrite = true, "
            "resume from its -state folder, or choose another output_name / output_dir"])

    # ---- 3. models ---------------------------------------------------------------------
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed
    mp = cfg.training.mixed_precision
    full = "full_bf16" if cfg.training.full_bf16 else "full_fp16" if cfg.training.full_fp16 \
        else None  # validated: full_bf16 comes with bf16, full_fp16 with fp16
    if mp != "no" and not torch.cuda.is_available():
        log.warning(f"mixed_precision = \"{mp}\" needs a CUDA GPU; training in fp32 on CPU")
        if full:
            log.warning(f"{full} is ignored: without mixed precision the LoRA weights stay "
                        "fp32")
        mp, full = "no", None
    # accelerate keeps its settings in a process-wide singleton that refuses a second run's
    # mixed_precision (tests, notebooks, in-process sweeps): start it afresh, keeping the
    # process group of `accelerate launch` (PartialState)
    AcceleratorState._reset_state(reset_partial_state=False)
    # cpu=True on a machine without CUDA makes `accelerate launch --multi_gpu` use gloo
    accelerator = Accelerator(mixed_precision=mp, gradient_accumulation_steps=accum,
                              cpu=not torch.cuda.is_available())
    set_seed(seed)
    device, weight_dtype = accelerator.device, DTYPES[mp]
    try:
        c = load_components_for(cfg.model, model_dir, family, weight_dtype)
    except ModelLoadError as e:
        return fail("Model error", [str(e)])
    vae_dtype = c.vae.dtype  # fp32 for SDXL's original VAE (library/models/vae.py)
    if cfg.training.zero_terminal_snr:
        apply_zero_terminal_snr(c.noise_scheduler)
    for m in [c.unet, c.vae, *c.text_encoders]:
        m.requires_grad_(False).eval().to(device)
    if cfg.training.gradient_checkpointing:
        c.unet.enable_gradient_checkpointing()
        for te in c.text_encoders:
            te.gradient_checkpointing_enable()
    for note in configure_attention_and_storage(c, cfg.model, device, weight_dtype):
        log.info(note)  # SDPA / xformers, fp8_base (before the LoRA attaches)

    # ---- 4. the LoRA network, optimizer and schedule -------------------------------------
    train_te = not cfg.lora.network_train_unet_only
    try:  # the targets, network_weights (strict) and the lr groups; nothing written yet
        network = build_network(c, family, cfg, net_args)
        if cfg.lora.network_weights:
            for note in load_network_weights(network, cfg.lora.network_weights, family.name,
                                             dict(c.unet.config), skipped_prefixes(cfg, family)):
                log.info(note)
        network.to(device)
        if full:  # LoRA weights (and so their gradients) in the compute dtype, no fp32 master
            network.to(weight_dtype)
            log.info(f"{full}: LoRA weights and gradients in {mp}")
        groups = param_groups(network, cfg, family.name, dict(c.unet.config), net_args)
    except ValueError as e:
        return fail("LoRA network error", [str(e)])
    network.attach().train()
    unet = fast_path(c.unet, network, cfg, dataset, device, accelerator.process_index,
                     world)  # after the attach; logs the `speed:` line
    log.info(f"LoRA on {len(network)} modules: " + ", ".join(
        f"{k} {len(v)}" for k, v in network.parts().items()))
    optimizer = make_optimizer(cfg.optimizer.optimizer_type, groups,
                               cfg.optimizer.learning_rate, cfg.optimizer.optimizer_args)
    lr_scheduler = scheduler_from_config(cfg.optimizer, optimizer, total_steps)
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    if accelerator.scaler is not None:  # fp16: dynamic loss scaling
        log.info("fp16: gradient scaler on (dynamic loss scaling)")
        if full == "full_fp16":
            patch_scaler_for_fp16_weights(accelerator.scaler)
    params = [p for p in network.parameters() if p.requires_grad]

    # ---- 5. caches and resume ---------------------------------------------------------------
    latents_of = LatentEncoder(c.vae, device, vae_dtype, seed)
    cache_lat, note_lat = cache_latents_for_run(d, items)  # unset: on when valid
    cache_te, note_te = cache_text_for_run(d, train_te, items)
    for note in (note_lat, note_te):
        if note:
            log.info(note)
    if cache_lat:  # content-addressed (library/data/cache.py)
        log.info(cache_latents(dataset, latents_of.sample_seeded, vae=c.vae,
                               vae_dtype=vae_dtype, to_disk=d.cache_latents_to_disk,
                               cache_dir=d.cache_dir, vae_batch_size=d.vae_batch_size,
                               progress=accelerator.is_main_process, seed=seed,
                               rank=accelerator.process_index,
                               world=accelerator.num_processes).summary())  # every rank logs
    conditioning = TextConditioner(c, family, cfg.model.clip_skip, train_te,
                                   keep_cache=cache_te,
                                   max_token_length=cfg.model.max_token_length,
                                   weighted=d.weighted_captions)
    note = truncation_note(c.tokenizers[0], [it.caption for it in items],
                           cfg.model.max_token_length)
    if note:  # said once per run: CLIP cuts longer captions silently
        log.warning(note)
    if cache_te:  # every static caption once, before training (library/data/text_cache.py)
        log.info(cache_text_encoder_outputs(
            conditioning, static_captions(dataset, val_set),
            to_disk=d.cache_text_encoder_outputs_to_disk,
            folder=text_cache_folder(d, items), batch_size=d.train_batch_size,
            progress=accelerator.is_main_process).summary())
    position = start or Position(0, 0, 0, seed)
    if cfg.saving.resume:
        try:
            resumed = load_state(Path(cfg.saving.resume), network=network, optimizer=optimizer,
                                 lr_scheduler=lr_scheduler, scaler=accelerator.scaler,
                                 generators={"latents": latents_of.gen})
        except StateError as e:
            return fail("Resume error", [str(e)])
        position = start or resumed  # initial_step overrides the state's step (kohya)
        log.info(f"resumed from {cfg.saving.resume} at step {position.step}")
    elif start:
        log.info(f"starting at step {start.step} (initial_step / initial_epoch)")
    ema = make_ema(cfg.training, network, cfg.saving.resume)  # ema_decay (library/train/ema.py)
    preservation = make_preservation(preservation_prompts, cfg.training, network, conditioning)

    # ---- 6. the loop ---------------------------------------------------------------------
    is_main = accelerator.is_main_process
    logging_dir = cfg.logging.logging_dir or str(paths["dir"] / "logs")
    tracker = Tracker(run_dir(logging_dir, cfg.saving.output_name, cfg.logging.log_prefix,
                              cfg.logging.log_tracker_name) if is_main else None,
                      config_to_toml(cfg), cfg.logging.log_with,
                      cfg.logging.log_tracker_name or "tomlora", config_to_dict(cfg),
                      wandb_name=cfg.logging.wandb_run_name, wandb_key=cfg.logging.wandb_api_key)
    loss_settings = LossSettings.from_config(cfg)
    loss_avg = LossAverage(steps_per_epoch)
    paths["dir"].mkdir(parents=True, exist_ok=True)
    if is_main:
        write_config_toml(cfg, paths["config"])
    sampler = Sampler(c, family, network, cfg, paths["dir"], tracker, device, weight_dtype,
                      seed, prompts, ema=ema)

    def save_lora_file(path: Path, step: int, epoch: int) -> None:
        meta = build_metadata(cfg, family, steps=step, epoch=epoch, num_images=len(items),
                              resolution=resolution, tag_frequency=tag_frequency(items),
                              bucket_info=bucket_info(dataset), seed=seed)
        with ema.applied():  # the EMA of the weights when ema_decay is set
            save_lora(network, path, precision=cfg.saving.save_precision,
                      layout=cfg.saving.save_model_as, family=family.name,
                      unet_config=dict(c.unet.config), metadata=meta)
        log.info(f"saved {path}")

    def save_training_state(folder: Path, pos: Position) -> None:
        save_state(folder, network=network, optimizer=optimizer, lr_scheduler=lr_scheduler,
                   scaler=accelerator.scaler, position=pos, fingerprint=state_fp,
                   generators={"latents": latents_of.gen}, config=state_cfg,
                   extra_tensors=ema.state_tensors())

    checkpoints = Checkpointer(cfg.saving, paths["dir"], paths["final"], save_lora_file,
                               save_training_state, is_main,
                               epochs=math.ceil(total_steps / steps_per_epoch))

    def validate(step: int) -> None:
        if val_set is None:
            return
        with ema.applied():
            v = validation_loss(val_set, unet=c.unet, family=family, scheduler=c.noise_scheduler,
                                encode_mean=latents_of.mean, conditioning=conditioning,
                                network=network, seed=seed, device=device,
                                weight_dtype=weight_dtype, autocast=accelerator.autocast,
                                v_prediction=loss_settings.v_prediction)
        tracker.scalars({"loss/validation": v}, step)
        log.info(f"step {step}: validation loss {v:.5f}")

    from tqdm.auto import tqdm
    global_step, epoch = position.step, position.epoch
    progress = tqdm(total=total_steps, initial=global_step, desc="steps", disable=not is_main)
    rank, world = accelerator.process_index, accelerator.num_processes
    started, images_done, micro, here, nan_streak = time.time(), 0, 0, position, 0
    stop = GracefulStop().install()  # Ctrl-C / SIGTERM: finish the step, save, exit
    try:
        if global_step == 0:
            sampler.maybe_sample(0, 0, first=True)
        while global_step < total_steps and not stop.requested:
            batches = dataset.batches(epoch)
            slot = 0
            for b_i, global_batch in enumerate(batches):
                if epoch == position.epoch and b_i < position.batches_done:
                    slot += len(global_batch)  # resumed: this batch was trained already
                    continue
                local = shard(global_batch, rank, world)
                batch = batch_to_device(dataset.collate(
                    local, epoch, slot + len(global_batch) * rank // world, global_step,
                    total_steps), device, cfg.training.pin_memory)
                slot += len(global_batch)
                set_batch_multiplier(network, batch)  # a dataset TOML's network_multiplier
                latents = batch["latents"] if "latents" in batch else \
                    latents_of.sample(batch["pixels"])
                step_begin(cfg.training)  # CUDA graphs: the last step's outputs are free
                with torch.set_grad_enabled(train_te):
                    cond = conditioning(batch["captions"])
                loss = diffusion_loss(unet, family, c.noise_scheduler, latents, cond, batch,
                                      loss_settings, weight_dtype=weight_dtype,
                                      autocast=accelerator.autocast, preservation=preservation)
                if not torch.isfinite(loss):
                    if not cfg.training.skip_nan_steps:
                        raise FloatingPointError(
                            f"loss is {loss.item()} at step {global_step + 1}: lower "
                            "learning_rate, or use bf16 / no_half_vae if fp16 overflowed "
                            "(skip_nan_steps = true skips such steps); files saved so far "
                            "are intact")
                    log.warning(f"step {global_step + 1}: non-finite loss, batch skipped")
                    optimizer.zero_grad(set_to_none=True)
                    nan_streak += 1
                    if nan_streak > len(batches):
                        raise FloatingPointError("every batch of a whole epoch gave a "
                                                 "non-finite loss; lower learning_rate")
                    continue
                nan_streak = 0
                accelerator.backward(loss * loss_share(len(local), len(global_batch), world))
                micro += 1
                images_done += len(global_batch)
                if micro % accum and b_i < len(batches) - 1:
                    continue  # accumulating: the optimizer steps every `accum` batches
                average_gradients(params, world)
                grad_norm = accelerator.clip_grad_norm_(params, cfg.optimizer.max_grad_norm) \
                    if cfg.optimizer.max_grad_norm > 0 else None
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                norms = apply_max_norm(network, cfg.optimizer.scale_weight_norms)  # {} if unset
                global_step += 1
                ema.update(global_step)
                current = loss.detach().item()
                average = loss_avg.add(current)
                tracker.scalars({"loss/current": current, "loss/average": average, **norms,
                                 **lr_scalars(optimizer), **step_scalars(
                                     grad_norm, images_done, time.time() - started)},
                                global_step)
                progress.set_postfix(loss=f"{average:.4f}",
                                     lr=f"{optimizer.param_groups[0]['lr']:.2e}")
                progress.update(1)
                sampler.maybe_sample(global_step, epoch + 1)
                here = Position(global_step, epoch, b_i + 1, seed) if b_i + 1 < len(batches) \
                    else Position(global_step, epoch + 1, 0, seed)
                checkpoints.after_step(global_step, epoch + 1, total_steps, here)
                if cfg.training.validate_every_n_steps and \
                        global_step % cfg.training.validate_every_n_steps == 0:
                    validate(global_step)
                if global_step >= total_steps or stop.after_step(global_step):
                    break
            if b_i == len(batches) - 1:  # the epoch is complete (also when training ends)
                epoch += 1
                tracker.scalars({"loss/epoch": loss_avg.mean}, epoch)
                sampler.maybe_sample(global_step, epoch, epoch_end=True)
                here = Position(global_step, epoch, 0, seed)
                checkpoints.after_epoch(epoch, global_step, total_steps, here)
                if cfg.training.validate_every_n_epochs and \
                        epoch % cfg.training.validate_every_n_epochs == 0:
                    validate(global_step)
        # Ctrl-C / SIGTERM: saved under the step's name (a signal during the final save
        # lets it finish)
        saved = checkpoints.interrupted(global_step, here.epoch + (here.batches_done > 0),
                                        here) if stop.requested else None
        if saved is None:
            checkpoints.final(global_step, max(epoch, 1), here)
    except (FloatingPointError, RuntimeError) as e:
        log.error(f"training failed: {e}")
        return 1
    except OSError as e:  # disk full, a folder removed: what was saved before is intact
        log.error(f"training failed at step {global_step}: cannot write "
                  f"{e.filename or 'a file'}: {e.strerror or e}; the files saved before are "
                  "intact: free space and resume from the last state folder")
        return 1
    finally:
        stop.restore()
        progress.close()
        tracker.close()
    if saved is not None:  # one line saying where the saves are
        print(stop.summary(global_step, saved), file=sys.stderr)
        return stop.exit_code
    accelerator.wait_for_everyone()
    print(f"\ndone: {global_step} steps in {time.time() - started:.0f} s\n"
          f"  LoRA:        {paths['final']}\n  config:      {paths['config']}\n"
          f"  TensorBoard: tensorboard --logdir {logging_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))  # Ctrl-C / SIGTERM before training: one line, exit 130 / 143
