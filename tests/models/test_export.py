"""The LDM writer on the full-size architectures (bundled configs, meta tensors: no memory):
real checkpoint key names and shapes, and diffusers' own converter maps every key back."""
from __future__ import annotations

import pytest
from accelerate import init_empty_weights

from library.models.export import clip_to_ldm, open_clip_to_ldm, unet_to_ldm, vae_to_ldm
from library.models.single_file import BUNDLED_CONFIGS, config_dir_for

# Parameter counts of the released models (runwayml/stable-diffusion-v1-5,
# stabilityai/stable-diffusion-xl-base-1.0).
PARAMS = {"sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
          "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                   "text_encoder_2": 694_659_840}}

# Keys (and shapes) as they appear in sd-v1-5 / sd_xl_base_1.0 .safetensors files.
GOLDEN = {
    "sd15": {
        "unet": {"input_blocks.3.0.op.weight": (320, 320, 3, 3),
                 "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
                 "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
                 "middle_block.2.out_layers.3.weight": (1280, 1280, 3, 3),
                 "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
                 "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
                 "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
                 "time_embed.2.weight": (1280, 1280), "out.2.weight": (4, 320, 3, 3)},
        "vae": {"encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
                "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
                "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
                "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
                "encoder.norm_out.weight": (512,)},
    },
    "sdxl": {
        "unet": {"label_emb.0.0.weight": (1280, 2816),
                 "input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
                 "input_blocks.4.1.proj_in.weight": (640, 640),
                 "input_blocks.6.0.op.weight": (640, 640, 3, 3),
                 "middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
                 "output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
                 "output_blocks.5.2.conv.weight": (640, 640, 3, 3),
                 "output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1)},
        "open_clip": {"transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
                      "transformer.resblocks.0.mlp.c_fc.weight": (5120, 1280),
                      "text_projection": (1280, 1280), "positional_embedding": (77, 1280),
                      "ln_final.weight": (1280,)},
    },
}


def build(family: str) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    d = config_dir_for(family, None)
    assert d == BUNDLED_CONFIGS / family
    with init_empty_weights():
        parts = {"unet": UNet2DConditionModel.from_config(
                     UNet2DConditionModel.load_config(d / "unet")),
                 "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(d / "vae")),
                 "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(
                     d / "text_encoder"))}
        if family == "sdxl":
            parts["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(d / "text_encoder_2"))
    return parts


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def full_size(request):
    return request.param, build(request.param)


def shapes(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items()}


def test_bundled_configs_are_the_released_models(full_size):
    family, parts = full_size
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()}
    assert counts == PARAMS[family]


def test_ldm_names_and_round_trip(full_size):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, \
        convert_ldm_vae_checkpoint, convert_open_clip_checkpoint
    family, parts = full_size
    unet, vae = parts["unet"], parts["vae"]
    ldm_unet = unet_to_ldm(unet.state_dict(), unet.config)
    ldm_vae = vae_to_ldm(vae.state_dict(), vae.config)
    golden = GOLDEN[family]
    assert golden["unet"].items() <= shapes(ldm_unet).items()
    if "vae" in golden:
        assert golden["vae"].items() <= shapes(ldm_vae).items()
    # diffusers' converter (LDM -> diffusers) maps every key back to its origin
    back = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v
                                        for k, v in ldm_unet.items()}, unet.config)
    assert shapes(back) == shapes(unet.state_dict())
    back = convert_ldm_vae_checkpoint({"first_stage_model." + k: v
                                       for k, v in ldm_vae.items()}, vae.config)
    assert shapes(back) == shapes(vae.state_dict())
    te = parts["text_encoder"]
    ldm_te = clip_to_ldm(te.state_dict(), 77)
    assert ldm_te["text_model.embeddings.token_embedding.weight"].shape == (49408, 768)
    assert len(ldm_te) == 197  # 196 weights + position_ids, as in the released files
    if family == "sdxl":
        te2 = parts["text_encoder_2"]
        ldm_te2 = open_clip_to_ldm(te2.state_dict())
        assert golden["open_clip"].items() <= shapes(ldm_te2).items()
        prefix = "conditioner.embedders.1.model."
        back = convert_open_clip_checkpoint(te2, {prefix + k: v for k, v in ldm_te2.items()},
                                            prefix=prefix)
        assert shapes(back) == shapes(te2.state_dict())


def test_make_tiny_model_single_file_option(tmp_path):
    from library.models.loading import detect_family
    from tools.make_tiny_model import main
    out = tmp_path / "tiny.safetensors"
    assert main(["--family", "sd15", "--out", str(tmp_path / "m"), "--single_file",
                 str(out)]) == 0
    assert detect_family(out).name == "sd15"
