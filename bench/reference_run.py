#!/usr/bin/env python
"""Whole-run reference for bench/bench_seed.py: a LoRA training run written the way diffusers'
example scripts (train_text_to_image_lora.py, train_text_to_image_lora_sdxl.py) write it.

The same work as the tomlora run it is compared with: the same model folder, images,
resolution, batch, accumulation, steps, LoRA rank/alpha on the same modules (kohya's UNet and
text-encoder targets through peft), mixed precision (fp16 with a GradScaler, or bf16), gradient
checkpointing, optimizer (bitsandbytes AdamW8bit or torch AdamW), schedule, clip 1.0, and the
same sample rounds (the prompt file, DDIM, 30 steps, CFG 7.5, native resolution). As the
diffusers LoRA examples do, the VAE encodes each batch in the loop (their datasets are
preprocessed images, not cached latents) and the text encoders run every step (they train).
The images are loaded and transformed once, before the loop (the examples do it in data-loader
workers), so the host time of image decoding is not counted against the reference.

Writes a JSON row: wall time of each phase, the time of every optimizer step, images/s of the
training phase (steps 2..N without the sample rounds), the peak memory of training (before the
final sample round) and of the whole run.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

T0 = time.time()
import torch  # noqa: E402

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                "ff.net.2"]  # kohya's default UNet targets (bench/bench_step.py)
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]  # kohya's CLIP targets


def load_images(folder: Path, reso: int) -> list[tuple[torch.Tensor, str]]:
    from PIL import Image
    out = []
    for img in sorted(p for p in folder.rglob("*.png")):
        im = Image.open(img).convert("RGB")
        s = reso / min(im.size)
        im = im.resize((max(reso, round(im.width * s)), max(reso, round(im.height * s))),
                       Image.BICUBIC)
        left, top = (im.width - reso) // 2, (im.height - reso) // 2
        im = im.crop((left, top, left + reso, top + reso))
        t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        t = t.view(reso, reso, 3).permute(2, 0, 1).float() / 127.5 - 1
        out.append((t, img.with_suffix(".txt").read_text().strip()))
    return out


def peak() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model_dir", required=True)
    ap.add_argument("--vae", help="a diffusers VAE folder (default: the model's vae/)")
    ap.add_argument("--data_dir", required=True)
    ap.add_argument("--family", choices=("sd15", "sdxl"), required=True)
    ap.add_argument("--resolution", type=int, required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--lr_scheduler", default="cosine_with_restarts")
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--mixed_precision", choices=("fp16", "bf16"), default="fp16")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--train_te", action="store_true")
    ap.add_argument("--optimizer", choices=("AdamW8bit", "AdamW"), default="AdamW8bit")
    ap.add_argument("--sample_every", type=int, default=0)
    ap.add_argument("--prompts", help="one prompt per line")
    ap.add_argument("--out", required=True)
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke test of the script
    dtype = torch.float16 if a.mixed_precision == "fp16" else torch.bfloat16
    md, xl = Path(a.model_dir), a.family == "sdxl"
    torch.manual_seed(0)
    random.seed(0)
    tok = [CLIPTokenizer.from_pretrained(md / "tokenizer")]
    tes = [CLIPTextModel.from_pretrained(md / "text_encoder", torch_dtype=dtype)]
    if xl:
        tok.append(CLIPTokenizer.from_pretrained(md / "tokenizer_2"))
        tes.append(CLIPTextModelWithProjection.from_pretrained(md / "text_encoder_2",
                                                               torch_dtype=dtype))
    vae = AutoencoderKL.from_pretrained(a.vae or md / "vae", torch_dtype=dtype)
    unet = UNet2DConditionModel.from_pretrained(md / "unet", torch_dtype=dtype)
    noise_sched = DDPMScheduler.from_pretrained(md / "scheduler")
    for m in (unet, vae, *tes):
        m.requires_grad_(False).to(dev)
    unet.add_adapter(LoraConfig(r=a.rank, lora_alpha=a.alpha, init_lora_weights="gaussian",
                                target_modules=UNET_TARGETS))
    if a.train_te:
        from peft import inject_adapter_in_model  # what transformers' add_adapter calls
        for te in tes:
            inject_adapter_in_model(LoraConfig(r=a.rank, lora_alpha=a.alpha,
                                               init_lora_weights="gaussian",
                                               target_modules=TE_TARGETS), te)
    if a.checkpointing:
        unet.enable_gradient_checkpointing()
        if a.train_te:
            for te in tes:
                te.gradient_checkpointing_enable()
    trained = [unet] + (tes if a.train_te else [])
    params = [p for m in trained for p in m.parameters() if p.requires_grad]
    for p in params:  # diffusers' cast_training_params: fp32 LoRA weights
        p.data = p.data.float()
    if a.optimizer == "AdamW8bit":
        import bitsandbytes as bnb
        opt = bnb.optim.AdamW8bit(params, lr=a.lr)
    else:
        opt = torch.optim.AdamW(params, lr=a.lr)
    lr_sched = get_scheduler(a.lr_scheduler, optimizer=opt, num_warmup_steps=a.warmup,
                             num_training_steps=a.steps)
    scaler = torch.amp.GradScaler(dev) if a.mixed_precision == "fp16" else None
    images = load_images(Path(a.data_dir), a.resolution)
    prompts = [line.strip() for line in Path(a.prompts).read_text().splitlines()
               if line.strip() and not line.startswith("#")] if a.prompts else []
    t_ready = time.time()

    def encode(captions: list[str]):
        hidden, pooled = [], None
        for i, (tk, te) in enumerate(zip(tok, tes)):
            ids = tk(captions, padding="max_length", max_length=77, truncation=True,
                     return_tensors="pt").input_ids.to(dev)
            out = te(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2] if xl else out.last_hidden_state)
            if xl and i == 1:
                pooled = out.text_embeds
        return torch.cat(hidden, dim=-1), pooled

    def sample(step: int) -> float:
        t = time.time()
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        kw = dict(vae=vae, unet=unet, scheduler=DDIMScheduler.from_pretrained(md / "scheduler"))
        if xl:
            pipe = StableDiffusionXLPipeline(text_encoder=tes[0], text_encoder_2=tes[1],
                                             tokenizer=tok[0], tokenizer_2=tok[1], **kw)
        else:
            pipe = StableDiffusionPipeline(text_encoder=tes[0], tokenizer=tok[0],
                                           safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False, **kw)
        pipe.set_progress_bar_config(disable=True)
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        with torch.no_grad(), torch.autocast(dev, dtype=dtype):
            for i, p in enumerate(prompts):
                g = torch.Generator(dev).manual_seed(i)
                img = pipe(p, num_inference_steps=30, guidance_scale=7.5, generator=g,
                           height=a.resolution, width=a.resolution).images[0]
                img.save(out / f"sample-{step:05d}-{i}.png")
        if dev == "cuda":
            torch.cuda.synchronize()
        return time.time() - t

    step_times, sample_s, micro, step = [], 0.0, 0, 0
    order: list[int] = []
    for m in trained:
        m.train()
    t_train = time.time()
    while step < a.steps:
        if len(order) < a.batch:
            order += random.sample(range(len(images)), len(images))
        idx, order = order[:a.batch], order[a.batch:]
        pixels = torch.stack([images[i][0] for i in idx]).to(dev, dtype)
        captions = [images[i][1] for i in idx]
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), device=dev)
        noisy = noise_sched.add_noise(latents, noise, t)
        with torch.autocast(dev, dtype=dtype):
            with torch.set_grad_enabled(a.train_te):
                hidden, pooled = encode(captions)
            kw = {}
            if xl:
                r = a.resolution
                ids = torch.tensor([[r, r, 0, 0, r, r]] * len(idx), device=dev, dtype=dtype)
                kw["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": ids}
            pred = unet(noisy, t, hidden, **kw).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float()) / a.accum
        (scaler.scale(loss) if scaler else loss).backward()
        micro += 1
        if micro % a.accum:
            continue
        if scaler:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        lr_sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        loss_value = loss.item()  # the examples log the loss every step
        step_times.append(time.time())
        if not math.isfinite(loss_value):
            print(f"step {step}: loss {loss_value}", file=sys.stderr)
        if a.sample_every and step % a.sample_every == 0 and prompts:
            train_peak = peak()
            sample_s += sample(step)
            step_times[-1] = time.time()  # the next interval starts after sampling
        print(f"step {step}/{a.steps} loss {loss_value:.4f}", flush=True)
    t_end = time.time()
    if not (a.sample_every and prompts):
        train_peak = peak()
    # training phase: steps 2..N, each interval from the end of the previous step (after its
    # sample round) to the end of this one
    spans = [b - s for s, b in zip(step_times, step_times[1:])]
    imgs = a.batch * a.accum * len(spans)
    row = {"variant": "reference", "family": a.family, "steps": step,
           "setup_s": t_ready - T0, "train_s": t_end - t_train, "sample_s": sample_s,
           "first_step_s": step_times[0] - t_train,
           "train_images_per_s": imgs / sum(spans) if spans else None,
           "step_s": sum(spans) / len(spans) if spans else None,
           "train_peak_gib": train_peak,
           "peak_gib": peak(),
           "wall_in_process_s": time.time() - T0}
    Path(a.json).write_text(json.dumps(row, indent=1))
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
