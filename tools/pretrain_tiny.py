"""Pretrain the tiny SD1.5-architecture model on the shapes world, on CPU, in minutes.

`tools/make_tiny_model.py --pretrain` calls `pretrained_pipeline(seed)`; docs/TINY_MODEL.md
explains the choices. In short, everything is arranged so the expensive part (the UNet) only
ever sees 8x8x4 latents, computed once:

1. VAE: a 3-level AutoencoderKL (32x32 pixels -> 8x8x4 latents) trained on varied
   flat-colour pictures (any colour, stars and rings too, so it can also reconstruct what a
   LoRA will later teach). Its `scaling_factor` is set from the latents' measured spread, as
   the SD VAE's 0.18215 was.
2. UNet and text encoder (the tiny CLIP of make_tiny_model), trained together with the SD
   noise schedule and epsilon loss (min-SNR weighting, Hang et al. 2023, converges faster),
   10 % empty captions so classifier-free guidance works, and an EMA of the weights (what is
   saved). The text encoder trains too: a random frozen one makes the UNet mix up which colour
   word is the shape's and which the background's ("a yellow triangle on a white background"
   came out white on yellow), and learning that binding from positions alone is slow.

Everything is seeded; with the same torch build and thread count the weights are identical.
"""
from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from library.train import noise as N
from tools import shapes

SIZE = 32  # pixels; latents are SIZE / 4


@dataclass(frozen=True)
class PretrainSettings:
    vae_steps: int = 3000
    vae_batch: int = 16
    vae_lr: float = 3e-3
    vae_scene_share: float = 0.5  # share of VAE pictures from the shapes world itself
    kl_weight: float = 1e-6
    scenes: int = 8000            # distinct pictures the UNet trains on (latents cached)
    nested_share: float = 0.5     # share of them that are a shape in a circle
    unet_steps: int = 1500
    unet_batch: int = 48
    unet_lr: float = 1.5e-3
    warmup: int = 50
    min_snr_gamma: float = 5.0
    caption_dropout: float = 0.1
    ema_decay: float = 0.99


def _log(msg: str) -> None:
    print(msg, flush=True)


# ---- components ------------------------------------------------------------------------------
def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4,
        norm_num_groups=8, sample_size=SIZE, scaling_factor=1.0, force_upcast=False)


def _pixels(images) -> torch.Tensor:
    """PIL images -> [B, 3, H, W] in [-1, 1], as the trainer feeds the VAE."""
    arr = np.stack([shapes.to_array(im) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) * 2 - 1


# ---- 1. VAE ----------------------------------------------------------------------------------
def _vae_picture(rng: random.Random, scene_share: float):
    if rng.random() < scene_share:
        return shapes.draw_scene(shapes.random_scene(rng, SIZE), SIZE)
    return shapes.random_vae_picture(rng, SIZE)


def train_vae(vae, s: PretrainSettings, rng: random.Random, device="cpu") -> float:
    """Reconstruction (MSE + L1 for crisp edges) plus a tiny KL term; returns the last loss."""
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _cosine(i, s.vae_steps, 20))
    started, loss = time.time(), float("nan")
    for step in range(s.vae_steps):
        x = _pixels([_vae_picture(rng, s.vae_scene_share) for _ in range(s.vae_batch)]
                    ).to(device)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss_t = torch.nn.functional.mse_loss(rec, x) + 0.5 * (rec - x).abs().mean() \
            + s.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss_t.backward()
        opt.step()
        sched.step()
        loss = loss_t.item()
        if step % 100 == 0 or step == s.vae_steps - 1:
            _log(f"  vae step {step:4d}  loss {loss:.4f}  ({time.time() - started:.0f} s)")
    vae.eval()
    return loss


@torch.no_grad()
def encode_scenes(vae, scenes: list, batch: int = 256, device="cpu"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every scene (unscaled latents)."""
    means, stds = [], []
    for i in range(0, len(scenes), batch):
        x = _pixels([shapes.draw_scene(sc, SIZE) for sc in scenes[i:i + batch]]).to(device)
        d = vae.encode(x).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


# ---- 2. text ---------------------------------------------------------------------------------
def caption_tokens(tokenizer, captions: list[str], device="cpu") -> torch.Tensor:
    """Token ids [len(captions), 77], padded as the trainer and the pipelines pad them."""
    from library.models.family import tokenize

    return tokenize(tokenizer, captions).to(device)


# ---- 3. UNet ---------------------------------------------------------------------------------
def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_unet(unet, text_encoder, scheduler, latents: tuple[torch.Tensor, torch.Tensor],
               scaling: float, caption_ids: torch.Tensor, tokens: torch.Tensor, empty_id: int,
               s: PretrainSettings, gen: torch.Generator, device="cpu"):
    """Epsilon-prediction training of the UNet and the text encoder together on cached
    latents; returns the EMA copies (unet, text_encoder). `tokens[i]` are the token ids of
    caption i. Random numbers come from the CPU generator `gen`, so a run draws the same
    batches on any device."""
    means, stds = latents
    model = torch.nn.ModuleDict({"unet": unet, "te": text_encoder})
    ema = copy.deepcopy(model).requires_grad_(False)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=s.unet_lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _cosine(i, s.unet_steps, s.warmup))
    alphas = scheduler.alphas_cumprod.to(device)
    started, avg = time.time(), None
    for step in range(s.unet_steps):
        idx = torch.randint(0, len(means), (s.unet_batch,), generator=gen)
        eps = torch.randn((s.unet_batch, *means.shape[1:]), generator=gen).to(device)
        z = (means[idx.to(device)] + stds[idx.to(device)] * eps) * scaling
        ids = caption_ids[idx].clone()
        ids[torch.rand(len(ids), generator=gen) < s.caption_dropout] = empty_id
        noise = N.make_noise(z.cpu(), generator=gen).to(device)
        t = N.sample_timesteps(len(z), scheduler.config.num_train_timesteps, "cpu", gen)
        ids, t = ids.to(device), t.to(device)
        context = text_encoder(tokens[ids])[0]
        pred = unet(scheduler.add_noise(z, noise, t), t, context).sample
        weight = N.min_snr_weight(alphas, t, s.min_snr_gamma, False)
        loss = (N.per_sample_loss(pred, noise) * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        # EMA warm-up (as in diffusers' EMAModel): early on, follow the weights closely.
        decay = min(s.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), model.parameters()):
                pe.lerp_(p, 1 - decay)
        avg = loss.item() if avg is None else 0.95 * avg + 0.05 * loss.item()
        if step % 50 == 0 or step == s.unet_steps - 1:
            _log(f"  unet step {step:4d}  loss {avg:.4f}  ({time.time() - started:.0f} s)")
    ema.eval()
    return ema["unet"], ema["te"]


# ---- all together ----------------------------------------------------------------------------
def pretrained_pipeline(tokenizer_dir, seed: int = 0, settings: PretrainSettings | None = None,
                        device: str = "cpu", vae_from=None):
    """A StableDiffusionPipeline (fp32, on the CPU) whose VAE and UNet are trained on the
    shapes world; `tokenizer_dir` holds make_tiny_model's hand-written tokenizer. `device`
    only speeds up experiments: the committed model is trained on the CPU. `vae_from` (a
    model folder) takes its VAE instead of training one: the VAE stage draws from its own
    random streams, so the UNet stage is the same either way."""
    from diffusers import DDPMScheduler, PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from tools.make_tiny_model import EOS, SCHEDULER_COMMON, _text_encoder, _unet_sd15, \
        make_vocab_and_merges

    s = settings or PretrainSettings()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    vocab, _ = make_vocab_and_merges()
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    text_encoder = _text_encoder(vocab, 2, "quick_gelu", vocab[EOS], False)
    vae, unet = make_vae().to(device), _unet_sd15().to(device)
    text_encoder.to(device)

    started = time.time()
    if vae_from:
        from diffusers import AutoencoderKL
        _log(f"pretraining the tiny model (seed {seed}): the VAE of {vae_from}")
        vae = AutoencoderKL.from_pretrained(vae_from, subfolder="vae").to(device).eval()
    else:
        _log(f"pretraining the tiny model (seed {seed}): VAE {s.vae_steps} steps")
        train_vae(vae, s, rng, device)
    scene_rng = random.Random(seed + 1)
    scenes = [shapes.random_world_scene(scene_rng, SIZE, s.nested_share)
              for _ in range(s.scenes)]
    means, stds = encode_scenes(vae, scenes, device=device)
    # As SD's 0.18215: scale latents to unit spread, so the noise schedule means the same.
    scaling = float(1.0 / means.std())
    vae.register_to_config(scaling_factor=round(scaling, 5))
    _log(f"  latent std {means.std():.3f} -> scaling_factor {scaling:.5f}; "
         f"posterior std {stds.mean():.4f}")

    captions = sorted({sc.caption for sc in scenes}) + [""]
    tokens = caption_tokens(tokenizer, captions, device)
    index = {c: i for i, c in enumerate(captions)}
    caption_ids = torch.tensor([index[sc.caption] for sc in scenes])
    noise_scheduler = DDPMScheduler(**SCHEDULER_COMMON)
    _log(f"UNet {s.unet_steps} steps x {s.unet_batch} on {len(scenes)} scenes, "
         f"{len(captions) - 1} captions")
    unet, text_encoder = train_unet(unet, text_encoder, noise_scheduler, (means, stds), scaling,
                                    caption_ids, tokens, index[""], s, gen, device)
    vae, unet, text_encoder = vae.cpu(), unet.cpu(), text_encoder.cpu()
    _log(f"pretraining done in {time.time() - started:.0f} s")
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, **SCHEDULER_COMMON),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
