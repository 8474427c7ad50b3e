"""Write SD1.5 / SDXL components as one LDM-layout checkpoint (A1111, ComfyUI, kohya).

diffusers reads this layout but has no writer, so the diffusers -> LDM names are derived here
from the UNet/VAE configs (the same facts kohya's model_util / sdxl_model_util encode). The
inverse direction is diffusers' converter, which the round-trip tests use as the check.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

UNET = "model.diffusion_model."
VAE = "first_stage_model."
TE_SD15 = "cond_stage_model.transformer."
TE1_SDXL = "conditioner.embedders.0.transformer."
TE2_SDXL = "conditioner.embedders.1.model."

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
}
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
                "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
             "to_out.0": "proj_out"}
_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
               "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}


def _rename(rest: str, table: dict[str, str]) -> str:
    """Rename the leading module name of `rest` (e.g. "conv1.weight") by `table`."""
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def unet_to_ldm(state: dict, config) -> dict:
    """diffusers UNet2DConditionModel keys -> `input_blocks.N.M...` keys (no prefix)."""
    per = config["layers_per_block"]
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        top = _rename(key, _UNET_TOP)
        if top != key:
            new = top
        elif parts[0] == "down_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], parts[3], ".".join(parts[4:])
            if kind == "downsamplers":  # downsamplers.0.conv.* -> input_blocks.K.0.op.*
                new = f"input_blocks.{(i + 1) * (per + 1)}.0.op.{rest.removeprefix('conv.')}"
            else:
                n = i * (per + 1) + int(j) + 1
                new = f"input_blocks.{n}.0.{_rename(rest, _UNET_RESNET)}" if kind == "resnets" \
                    else f"input_blocks.{n}.1.{rest}"
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            new = f"middle_block.{2 * j}.{_rename(rest, _UNET_RESNET)}" if kind == "resnets" \
                else f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], parts[3], ".".join(parts[4:])
            if kind == "upsamplers":  # after the last resnet (and its attention, if any)
                n = i * (per + 1) + per
                new = f"output_blocks.{n}.{2 if up_attn[i] else 1}.{rest}"
            else:
                n = i * (per + 1) + int(j)
                new = f"output_blocks.{n}.0.{_rename(rest, _UNET_RESNET)}" if kind == "resnets" \
                    else f"output_blocks.{n}.1.{rest}"
        else:
            raise ValueError(f"UNet key {key!r} has no LDM name (not an SD1.5/SDXL UNet?)")
        out[new] = value
    return out


def vae_to_ldm(state: dict, config) -> dict:
    """diffusers AutoencoderKL keys -> `encoder.down.N.block.M...` keys (no prefix)."""
    n_up = len(config["up_block_types"])
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        side = parts[0]
        if len(parts) > 2 and parts[1] in ("down_blocks", "up_blocks"):
            i, kind, j = int(parts[2]), parts[3], parts[4]
            rest = ".".join(parts[5:])
            name, block = ("down", i) if parts[1] == "down_blocks" else ("up", n_up - 1 - i)
            if kind == "resnets":
                new = f"{side}.{name}.{block}.block.{j}.{_rename(rest, _VAE_RESNET)}"
            else:  # downsamplers.0.conv / upsamplers.0.conv
                new = f"{side}.{name}.{block}.{'downsample' if name == 'down' else 'upsample'}" \
                      f".{rest}"
        elif len(parts) > 2 and parts[1] == "mid_block":
            kind, j, rest = parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                new = f"{side}.mid.block_{j + 1}.{_rename(rest, _VAE_RESNET)}"
            else:
                new = f"{side}.mid.attn_1.{_rename(rest, _VAE_ATTN)}"
                if value.dim() == 2:  # LDM's attention projections are 1x1 convs
                    value = value[:, :, None, None]
        else:
            new = key.replace("conv_norm_out", "norm_out")
        out[new] = value
    return out


def clip_to_ldm(state: dict, max_positions: int) -> dict:
    """transformers CLIPTextModel keys -> `text_model.*` under the caller's prefix. The
    position_ids buffer is written as the original checkpoints carry it."""
    out = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
    out["text_model.embeddings.position_ids"] = torch.arange(max_positions)[None]
    return out


def open_clip_to_ldm(state: dict) -> dict:
    """transformers CLIPTextModelWithProjection keys -> OpenCLIP keys (fused q/k/v)."""
    out = {}
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        k = key.removeprefix("text_model.")
        if k == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif k == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif k == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif k.startswith("final_layer_norm."):
            out["ln_final." + k.split(".", 1)[1]] = value
        elif k.startswith("encoder.layers."):
            _, _, i, rest = k.split(".", 3)
            proj = rest.split(".")[1] if rest.startswith("self_attn.") else ""
            if proj in ("q_proj", "k_proj", "v_proj"):
                layers.setdefault(f"{i}.{rest.rsplit('.', 1)[1]}", {})[proj] = value
            else:
                out[f"transformer.resblocks.{i}.{_rename(rest, _CLIP_LAYER)}"] = value
        elif k != "embeddings.position_ids":
            raise ValueError(f"text encoder 2 key {key!r} has no OpenCLIP name")
    for name, qkv in layers.items():
        i, kind = name.split(".")
        out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
            [qkv["q_proj"], qkv["k_proj"], qkv["v_proj"]])
    return out


def ldm_state_dict(components, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """One LDM state dict of the UNet, VAE and text encoders of `components`."""
    def sd(module):
        return {k: v.detach().to("cpu", dtype if dtype and v.is_floating_point() else v.dtype)
                for k, v in module.state_dict().items()}

    out = {UNET + k: v for k, v in unet_to_ldm(sd(components.unet),
                                               components.unet.config).items()}
    out.update({VAE + k: v for k, v in vae_to_ldm(sd(components.vae),
                                                  components.vae.config).items()})
    tes = components.text_encoders
    n_pos = tes[0].config.max_position_embeddings
    if components.family.name == "sd15":
        out.update({TE_SD15 + k: v for k, v in clip_to_ldm(sd(tes[0]), n_pos).items()})
    else:
        out.update({TE1_SDXL + k: v for k, v in clip_to_ldm(sd(tes[0]), n_pos).items()})
        out.update({TE2_SDXL + k: v for k, v in open_clip_to_ldm(sd(tes[1])).items()})
    return out


def save_single_file(components, path: str | Path, *, dtype: torch.dtype | None = None,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write `components` as one `.safetensors` LDM checkpoint (atomically: a temporary
    file renamed into place). `dtype` casts floating tensors (e.g. torch.float16)."""
    from safetensors.torch import save_file
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: single-file checkpoints are written as .safetensors")
    state = {k: v.contiguous() for k, v in ldm_state_dict(components, dtype).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(state, str(tmp), metadata={"format": "pt", **(metadata or {})})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
