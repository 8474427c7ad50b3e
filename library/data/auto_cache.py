"""Whether a run caches latents and text-encoder outputs (docs/DATASETS.md, Caches).

`cache_latents` and `cache_text_encoder_outputs` left unset mean "cache when it trains the
same thing": the VAE and the frozen text encoders then run once per image or caption
instead of once per step. `true` and `false` are what the user asked for (an explicit
`true` is checked in library/config/validate.py as before).

- Latents: cached unless some image set uses `random_crop` (each step needs a fresh crop
  of the pixels, which a cached latent cannot give). `flip_aug` and `alpha_mask` are cached
  with the latents.
- Text-encoder outputs: cached when the text encoders are frozen
  (`network_train_unet_only`), every caption is the same at every step (no shuffle, tag
  dropout, token warm-up or wildcards) and there are at most AUTO_TEXT_CACHE_MAX distinct
  captions (the outputs stay on the GPU: about 0.3 MB per caption for SDXL).
"""
from __future__ import annotations

from library.config.validate import VARYING_CAPTION_KEYS
from library.data.text_cache import static_caption

AUTO_TEXT_CACHE_MAX = 2000


def cache_latents_for_run(d, items) -> tuple[bool, str | None]:
    """(cache latents?, a line for the log when the default decided)."""
    if d.cache_latents_to_disk or d.cache_latents is not None:
        return bool(d.cache_latents_to_disk or d.cache_latents), None
    if any(i.opts.random_crop for i in items):
        return False, ("cache_latents unset: off, because random_crop needs a new crop of "
                       "the pixels at every step")
    return True, ("cache_latents unset: on (every image is encoded once; set "
                  "cache_latents = false to run the VAE at every step)")


def cache_text_for_run(d, train_text_encoder: bool, items) -> tuple[bool, str | None]:
    """(cache text-encoder outputs?, a line for the log when the default decided)."""
    if d.cache_text_encoder_outputs_to_disk or d.cache_text_encoder_outputs is not None:
        return bool(d.cache_text_encoder_outputs_to_disk or d.cache_text_encoder_outputs), None
    if train_text_encoder:
        return False, None  # the text encoders train: nothing to cache, nothing to say
    if any(getattr(d, k) for k in VARYING_CAPTION_KEYS) or \
            any(static_caption(i) is None for i in items):  # subsets of a dataset TOML too
        return False, ("cache_text_encoder_outputs unset: off, because some captions "
                       "change from step to step")
    distinct = {i.caption for i in items}
    if len(distinct) > AUTO_TEXT_CACHE_MAX:
        return False, (f"cache_text_encoder_outputs unset: off, because {len(distinct)} "
                       f"distinct captions (> {AUTO_TEXT_CACHE_MAX}) would fill GPU memory; "
                       "set it to true to cache anyway")
    return True, ("cache_text_encoder_outputs unset: on (frozen text encoders, static "
                  "captions; set it to false to encode at every step)")
