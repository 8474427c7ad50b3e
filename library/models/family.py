"""What differs between SD1.5 and SDXL, as a small protocol (DESIGN.md §3.3).

The training loop, sampling and saving only talk to a `ModelFamily`; no other module branches
on the family name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class Components:
    """Loaded model parts. `text_encoders` / `tokenizers` are lists (one for SD1.5, two for
    SDXL) in the order of `family.te_prefixes`."""
    family: "ModelFamily"
    unet: Any
    vae: Any
    text_encoders: list
    tokenizers: list
    noise_scheduler: Any
    model_path: str
    vae_path: str | None = None
    extra: dict = field(default_factory=dict)


class ModelFamily(Protocol):
    name: str                      # "sd15" / "sdxl"
    native_resolution: int         # 512 / 1024
    te_prefixes: tuple[str, ...]   # kohya key prefixes of the text encoders
    base_model_version: str        # kohya ss_base_model_version
    modelspec_architecture: str    # sai modelspec architecture of a LoRA
    pipeline_class: str            # diffusers pipeline class name

    def encode_prompts(self, c: Components, captions: list[str], clip_skip: int = 1,
                       max_token_length: int = 75, weighted: bool = False
                       ) -> dict[str, torch.Tensor]:
        """Text conditioning for a batch of captions: `encoder_hidden_states` and, for SDXL,
        `pooled`. Every tensor has the batch as its first dim. `max_token_length` 150/225
        encodes 75-token chunks (library/models/text_encoding.py); `weighted` parses the
        `(word:1.2)` syntax (library/models/prompt_weights.py)."""

    def pipeline_inputs(self, positive: dict, negative: dict, negative_is_empty: bool
                        ) -> dict[str, torch.Tensor]:
        """`encode_prompts` outputs of one prompt and its negative prompt as the keyword
        arguments (`prompt_embeds`, ...) of the family's pipeline, so samples are conditioned
        exactly as training is."""

    def unet_inputs(self, conditioning: dict[str, torch.Tensor], batch: dict
                    ) -> dict[str, Any]:
        """Keyword arguments for `unet(noisy, t, **kwargs)` beyond the latents and time."""

    def unet_lora_name(self, module_path: str, unet_config: dict) -> str:
        """kohya key stem of a UNet module."""

    def pipeline(self, c: Components):
        """A diffusers pipeline over the components, for sampling."""


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def final_layer_norm(text_encoder):
    """The CLIP final LayerNorm, wherever transformers puts it."""
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.final_layer_norm
