"""SDXL: CLIP-L + OpenCLIP bigG penultimate states concatenated, pooled bigG embedding and the
size/crop micro-conditioning (original size, crop top-left, target size) as time ids."""
from __future__ import annotations

import torch

from library.models.family import Components
from library.models.text_encoding import chunk_ids, first_chunk, merge_chunks, weigh
from networks import formats


class SDXL:
    name = "sdxl"
    native_resolution = 1024
    te_prefixes = ("lora_te1", "lora_te2")
    base_model_version = "sdxl_base_v1-0"
    modelspec_architecture = "stable-diffusion-xl-v1-base/lora"
    pipeline_class = "StableDiffusionXLPipeline"

    def encode_prompts(self, c: Components, captions: list[str], clip_skip: int = 1,
                       max_token_length: int = 75, weighted: bool = False):
        # SDXL was trained on the penultimate layer; clip_skip=k moves k-1 layers further.
        layer = -(max(clip_skip, 1) + 1)
        hidden = []
        pooled = None
        for te, tok in zip(c.text_encoders, c.tokenizers):
            chunks, weights = chunk_ids(tok, captions, max_token_length, weighted)
            n = chunks.shape[1]
            out = te(chunks.reshape(-1, chunks.shape[-1]).to(te.device),
                     output_hidden_states=True)
            hidden.append(weigh(merge_chunks(out.hidden_states[layer], n), weights))
            if hasattr(out, "text_embeds"):
                pooled = first_chunk(out.text_embeds, n)  # kohya: the first chunk's pooling
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "pooled": pooled}

    def pipeline_inputs(self, positive: dict, negative: dict, negative_is_empty: bool) -> dict:
        """Encoded prompt and negative prompt as the pipeline's embedding arguments. An empty
        negative prompt is all zeros (hidden states and pooled), as the SDXL pipeline does
        with `force_zeros_for_empty_prompt` (the released SDXL base config)."""
        if negative_is_empty:
            negative = {k: torch.zeros_like(v) for k, v in positive.items()}
        return {"prompt_embeds": positive["encoder_hidden_states"],
                "pooled_prompt_embeds": positive["pooled"],
                "negative_prompt_embeds": negative["encoder_hidden_states"],
                "negative_pooled_prompt_embeds": negative["pooled"]}

    def unet_inputs(self, conditioning, batch):
        pooled = conditioning["pooled"]
        time_ids = time_ids_for(batch["original_size"], batch["crop_top_left"],
                                batch["target_size"]).to(pooled.device, pooled.dtype)
        return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

    def unet_lora_name(self, module_path: str, unet_config: dict) -> str:
        return formats.unet_module_to_kohya(module_path, self.name, unet_config)

    def pipeline(self, c: Components):
        from diffusers import StableDiffusionXLPipeline
        return StableDiffusionXLPipeline(
            vae=c.vae, text_encoder=c.text_encoders[0], text_encoder_2=c.text_encoders[1],
            tokenizer=c.tokenizers[0], tokenizer_2=c.tokenizers[1], unet=c.unet,
            scheduler=c.noise_scheduler, force_zeros_for_empty_prompt=True)


def time_ids_for(original_size, crop_top_left, target_size) -> torch.Tensor:
    """[B, 6] = (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per sample; each
    argument is a [B, 2] tensor (or list of pairs) in (height, width) / (top, left) order."""
    parts = [torch.as_tensor(x, dtype=torch.float32).reshape(-1, 2)
             for x in (original_size, crop_top_left, target_size)]
    return torch.cat(parts, dim=1)
