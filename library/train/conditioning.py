"""Text conditioning for a batch of captions, with an optional cache.

With frozen text encoders the encoder outputs of a caption never change, so they are kept
per caption: always within a step, and for the whole run with `cache_text_encoder_outputs`
(valid only with static captions; the config check enforces that). The run fills that cache
before training (library/data/text_cache.py, also from disk with
`cache_text_encoder_outputs_to_disk`); a caption not in it is encoded when first seen.
"""
from __future__ import annotations

import torch


class TextConditioner:
    def __init__(self, components, family, clip_skip: int, train_text_encoder: bool,
                 keep_cache: bool, max_token_length: int = 75, weighted: bool = False):
        self.c, self.family, self.clip_skip = components, family, clip_skip
        self.max_token_length = max_token_length
        self.weighted = weighted  # weighted_captions: a caption's outputs stay per caption
        self.train_te = train_text_encoder
        self.keep = keep_cache
        self.cache: dict[str, dict[str, torch.Tensor]] = {}

    def __call__(self, captions: list[str]) -> dict:
        if self.train_te and torch.is_grad_enabled():
            return self.family.encode_prompts(self.c, captions, self.clip_skip,
                                              self.max_token_length, self.weighted)
        if self.train_te:  # validation / no-grad use with a trained encoder: never cache
            with torch.no_grad():
                return self.family.encode_prompts(self.c, captions, self.clip_skip,
                                                  self.max_token_length, self.weighted)
        missing = [t for t in dict.fromkeys(captions) if t not in self.cache]
        if missing:
            self.cache.update(zip(missing, self.encode(missing)))
        first = self.cache[captions[0]]
        cond = {k: torch.stack([self.cache[t][k] for t in captions]) for k in first}
        if not self.keep:
            self.cache.clear()
        return cond

    @torch.no_grad()
    def encode(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        """The frozen text encoders' outputs of each caption ({name: tensor without the batch
        dim}; None entries, e.g. SD1.5's pooled, left out), bypassing the cache."""
        enc = self.family.encode_prompts(self.c, captions, self.clip_skip,
                                         self.max_token_length, self.weighted)
        return [{k: v[i] for k, v in enc.items() if v is not None}
                for i in range(len(captions))]


class LatentEncoder:
    """VAE encoding to scaled latents: a sample (seeded generator, for training; per-image
    seeds for the latent cache) or the mean (for validation)."""

    def __init__(self, vae, device, dtype, seed: int):
        self.vae, self.device, self.dtype = vae, device, dtype
        self.scaling = vae.config.scaling_factor
        self.gen = torch.Generator(device="cpu").manual_seed(seed)

    @torch.no_grad()
    def sample(self, px: torch.Tensor) -> torch.Tensor:
        dist = self.vae.encode(px.to(self.device, self.dtype)).latent_dist
        eps = torch.randn(dist.mean.shape, generator=self.gen).to(self.device, dist.mean.dtype)
        return (dist.mean + dist.std * eps) * self.scaling

    @torch.no_grad()
    def sample_seeded(self, px: torch.Tensor, seeds) -> torch.Tensor:
        """A sample whose noise for image i comes from its own generator seeded with
        `seeds[i]` (the latent cache), so it does not depend on the batch or on which process
        encodes it; `self.gen` (the per-step path and resume state) is left untouched."""
        dist = self.vae.encode(px.to(self.device, self.dtype)).latent_dist
        eps = torch.stack([torch.randn(dist.mean.shape[1:],
                                       generator=torch.Generator("cpu").manual_seed(int(s)))
                           for s in seeds]).to(self.device, dist.mean.dtype)
        return (dist.mean + dist.std * eps) * self.scaling

    @torch.no_grad()
    def mean(self, px: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(px.to(self.device, self.dtype)).latent_dist.mean * self.scaling
