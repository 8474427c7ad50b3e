"""Stable Diffusion 1.x: one CLIP-L text encoder, UNet conditioned on its hidden states."""
from __future__ import annotations

from library.models.family import Components, final_layer_norm
from library.models.text_encoding import chunk_ids, merge_chunks, weigh
from networks import formats


class SD15:
    name = "sd15"
    native_resolution = 512
    te_prefixes = ("lora_te",)
    base_model_version = "sd_v1"
    modelspec_architecture = "stable-diffusion-v1/lora"
    pipeline_class = "StableDiffusionPipeline"

    def encode_prompts(self, c: Components, captions: list[str], clip_skip: int = 1,
                       max_token_length: int = 75, weighted: bool = False):
        te = c.text_encoders[0]
        chunks, weights = chunk_ids(c.tokenizers[0], captions, max_token_length, weighted)
        n = chunks.shape[1]
        ids = chunks.reshape(-1, chunks.shape[-1]).to(te.device)
        if clip_skip <= 1:
            hidden = te(ids)[0]
        else:
            # kohya clip_skip=k: the k-th hidden state from the end, through the final norm.
            out = te(ids, output_hidden_states=True)
            hidden = final_layer_norm(te)(out.hidden_states[-clip_skip])
        return {"encoder_hidden_states": weigh(merge_chunks(hidden, n), weights)}

    def pipeline_inputs(self, positive: dict, negative: dict, negative_is_empty: bool) -> dict:
        """Encoded prompt and negative prompt as the pipeline's embedding arguments."""
        return {"prompt_embeds": positive["encoder_hidden_states"],
                "negative_prompt_embeds": negative["encoder_hidden_states"]}

    def unet_inputs(self, conditioning, batch):
        return {}

    def unet_lora_name(self, module_path: str, unet_config: dict) -> str:
        return formats.unet_module_to_kohya(module_path, self.name, unet_config)

    def pipeline(self, c: Components):
        from diffusers import StableDiffusionPipeline
        return StableDiffusionPipeline(
            vae=c.vae, text_encoder=c.text_encoders[0], tokenizer=c.tokenizers[0], unet=c.unet,
            scheduler=c.noise_scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)

