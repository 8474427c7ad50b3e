"""Tests for networks/formats.py: UNet/text-encoder key names, peft conversion, block indices."""

import re

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from peft.tuners.lora import LoraLayer
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from networks import formats as F

# Real full-size configs (only the fields that decide the module tree).
SDXL = {
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
}
SD15 = {
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "sample_size": 64,
}
# Tiny models with the real topologies (LORA_FORMAT.md, "Tiny models").
SDXL_TINY = {
    **SDXL,
    "block_out_channels": (32, 32, 64),
    "transformer_layers_per_block": (1, 1, 2),
    "norm_num_groups": 8,
    "attention_head_dim": (2, 2, 4),
    "cross_attention_dim": 64,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80,
    "sample_size": 8,
}
SD15_TINY = {
    **SD15,
    "block_out_channels": (32, 32, 64, 64),
    "norm_num_groups": 8,
    "attention_head_dim": 4,
    "cross_attention_dim": 32,
    "use_linear_projection": False,
    "sample_size": 8,
}

# Golden SDXL keys: kohya sdxl_model_util / ComfyUI unet_to_diffusers naming (LDM/SGM).
SDXL_GOLDEN = {
    "conv_in": "input_blocks_0_0",
    "time_embedding.linear_1": "time_embed_0",
    "time_embedding.linear_2": "time_embed_2",
    "add_embedding.linear_1": "label_emb_0_0",
    "add_embedding.linear_2": "label_emb_0_2",
    "down_blocks.0.resnets.0.conv1": "input_blocks_1_0_in_layers_2",
    "down_blocks.0.resnets.0.time_emb_proj": "input_blocks_1_0_emb_layers_1",
    "down_blocks.0.resnets.1.conv1": "input_blocks_2_0_in_layers_2",
    "down_blocks.0.resnets.1.norm2": "input_blocks_2_0_out_layers_0",
    "down_blocks.0.downsamplers.0.conv": "input_blocks_3_0_op",
    "down_blocks.1.resnets.0.conv_shortcut": "input_blocks_4_0_skip_connection",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_out.0": "input_blocks_4_1_transformer_blocks_1_attn2_to_out_0",
    "down_blocks.1.attentions.1.proj_out": "input_blocks_5_1_proj_out",
    "down_blocks.1.downsamplers.0.conv": "input_blocks_6_0_op",
    "down_blocks.2.attentions.0.transformer_blocks.9.ff.net.2": "input_blocks_7_1_transformer_blocks_9_ff_net_2",
    "down_blocks.2.attentions.1.transformer_blocks.3.attn2.to_k": "input_blocks_8_1_transformer_blocks_3_attn2_to_k",
    "down_blocks.2.resnets.1.conv2": "input_blocks_8_0_out_layers_3",
    "mid_block.resnets.0.conv1": "middle_block_0_in_layers_2",
    "mid_block.attentions.0.proj_in": "middle_block_1_proj_in",
    "mid_block.attentions.0.transformer_blocks.5.attn1.to_v": "middle_block_1_transformer_blocks_5_attn1_to_v",
    "mid_block.resnets.1.time_emb_proj": "middle_block_2_emb_layers_1",
    "up_blocks.0.resnets.0.conv_shortcut": "output_blocks_0_0_skip_connection",
    "up_blocks.0.attentions.2.transformer_blocks.9.ff.net.0.proj": "output_blocks_2_1_transformer_blocks_9_ff_net_0_proj",
    "up_blocks.0.upsamplers.0.conv": "output_blocks_2_2_conv",
    "up_blocks.1.attentions.0.proj_in": "output_blocks_3_1_proj_in",
    "up_blocks.1.resnets.2.conv2": "output_blocks_5_0_out_layers_3",
    "up_blocks.1.upsamplers.0.conv": "output_blocks_5_2_conv",
    "up_blocks.2.resnets.0.conv1": "output_blocks_6_0_in_layers_2",
    "up_blocks.2.resnets.2.conv_shortcut": "output_blocks_8_0_skip_connection",
    "conv_norm_out": "out_0",
    "conv_out": "out_2",
}
# SD1.5 files keep diffusers names.
SD15_GOLDEN = {
    "down_blocks.0.attentions.0.proj_in": "down_blocks_0_attentions_0_proj_in",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
    "down_blocks.2.downsamplers.0.conv": "down_blocks_2_downsamplers_0_conv",
    "down_blocks.3.resnets.1.time_emb_proj": "down_blocks_3_resnets_1_time_emb_proj",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj": "mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj",
    "up_blocks.0.upsamplers.0.conv": "up_blocks_0_upsamplers_0_conv",
    "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_out.0": "up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0",
    "up_blocks.3.resnets.2.conv_shortcut": "up_blocks_3_resnets_2_conv_shortcut",
}
# The SD1.5 UNet under LDM naming (the original v1 checkpoint keys): up block 0 has no
# attentions, so its upsampler is `.1.conv`, and there are four down blocks.
SD15_AS_LDM = {
    "down_blocks.0.attentions.1.proj_in": "input_blocks_2_1_proj_in",
    "down_blocks.2.downsamplers.0.conv": "input_blocks_9_0_op",
    "down_blocks.3.resnets.1.conv2": "input_blocks_11_0_out_layers_3",
    "up_blocks.0.upsamplers.0.conv": "output_blocks_2_1_conv",
    "up_blocks.1.upsamplers.0.conv": "output_blocks_5_2_conv",
    "up_blocks.3.attentions.2.proj_out": "output_blocks_11_1_proj_out",
}
# layers_per_block = 1: the LDM stride is 2, not 3.
LPB1 = {**SDXL, "layers_per_block": 1}
LPB1_GOLDEN = {
    "down_blocks.0.resnets.0.conv1": "input_blocks_1_0_in_layers_2",
    "down_blocks.0.downsamplers.0.conv": "input_blocks_2_0_op",
    "down_blocks.1.attentions.0.proj_in": "input_blocks_3_1_proj_in",
    "down_blocks.2.attentions.0.proj_in": "input_blocks_5_1_proj_in",
    "mid_block.attentions.0.proj_in": "middle_block_1_proj_in",
    "up_blocks.0.resnets.1.conv1": "output_blocks_1_0_in_layers_2",
    "up_blocks.0.upsamplers.0.conv": "output_blocks_1_2_conv",
    "up_blocks.1.attentions.1.proj_out": "output_blocks_3_1_proj_out",
    "up_blocks.2.resnets.1.conv_shortcut": "output_blocks_5_0_skip_connection",
}

CASES = [
    *[("sdxl", SDXL, p, k) for p, k in SDXL_GOLDEN.items()],
    *[("sd15", SD15, p, k) for p, k in SD15_GOLDEN.items()],
    *[("sdxl", SD15, p, k) for p, k in SD15_AS_LDM.items()],
    *[("sdxl", LPB1, p, k) for p, k in LPB1_GOLDEN.items()],
]


@pytest.mark.parametrize("family,cfg,path,key", CASES)
def test_golden_unet_keys(family, cfg, path, key):
    assert F.unet_module_to_kohya(path, family, cfg) == "lora_unet_" + key
    assert F.kohya_to_unet_module("lora_unet_" + key, family, cfg) == path
    assert F.kohya_to_unet_module(f"lora_unet_{key}.lora_down.weight", family, cfg) == path


@pytest.mark.parametrize(
    "family,path",
    [
        ("sdxl", "down_blocks.0.attentions.0.proj_in"),  # DownBlock2D has no attentions
        ("sdxl", "down_blocks.2.downsamplers.0.conv"),  # last down block: no downsampler
        ("sdxl", "up_blocks.2.upsamplers.0.conv"),
        ("sdxl", "down_blocks.2.attentions.0.transformer_blocks.10.attn1.to_q"),  # depth 10
        ("sdxl", "down_blocks.1.resnets.2.conv1"),
        ("sdxl", "down_blocks.0.resnets.0.nonlinearity"),
        ("sdxl", "down_blocks.3.resnets.0.conv1"),
        ("sdxl", "text_model.encoder.layers.0.mlp.fc1"),
        ("sd15", "up_blocks.3.upsamplers.0.conv"),
        ("sd15", "mid_block.attentions.1.proj_in"),
    ],
)
def test_unmappable_paths_raise(family, path):
    with pytest.raises(ValueError, match=re.escape(repr(path))):
        F.unet_module_to_kohya(path, family, SDXL if family == "sdxl" else SD15)


@pytest.mark.parametrize(
    "family,key",
    [
        ("sdxl", "lora_unet_input_blocks_3_1_proj_in"),  # slot 3 is the downsampler
        ("sdxl", "lora_unet_input_blocks_1_1_proj_in"),  # down block 0 has no attentions
        ("sdxl", "lora_unet_output_blocks_8_2_conv"),
        ("sdxl", "lora_unet_down_blocks_1_attentions_0_proj_in"),  # diffusers names on SDXL
        ("sd15", "lora_unet_input_blocks_4_1_proj_in"),  # LDM names on SD1.5
        ("sd15", "lora_te_text_model_encoder_layers_0_mlp_fc1"),
    ],
)
def test_unmappable_keys_raise(family, key):
    with pytest.raises(ValueError):
        F.kohya_to_unet_module(key, family, SDXL if family == "sdxl" else SD15)


def test_unknown_family_raises():
    with pytest.raises(ValueError, match="family"):
        F.unet_module_to_kohya("conv_in", "sd21", SD15)


# --- Full-size module trees (meta tensors, no memory) ---


def _targets(unet, locon: bool) -> dict[str, torch.nn.Module]:
    """kohya's default selection: Linear/Conv2d inside Transformer2DModel (+ resnets/samplers)."""
    parents = (Transformer2DModel, ResnetBlock2D, Downsample2D, Upsample2D) if locon else (Transformer2DModel,)
    out = {}
    for name, module in unet.named_modules():
        if isinstance(module, parents):
            for child_name, child in module.named_modules():
                if isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)):
                    out[f"{name}.{child_name}"] = child
    return out


@pytest.fixture(scope="module")
def full_unets():
    with init_empty_weights():
        return {"sd15": UNet2DConditionModel(**SD15), "sdxl": UNet2DConditionModel(**SDXL)}


@pytest.mark.parametrize("family,n_attn,n_locon", [("sd15", 192, 278), ("sdxl", 722, 788)])
def test_full_size_targets(full_unets, family, n_attn, n_locon):
    unet, cfg = full_unets[family], full_unets[family].config
    assert len(_targets(unet, locon=False)) == n_attn
    targets = _targets(unet, locon=True)
    assert len(targets) == n_locon
    keys = {p: F.unet_module_to_kohya(p, family, cfg) for p in targets}
    assert len(set(keys.values())) == len(keys)
    for path, key in keys.items():
        assert re.fullmatch(r"lora_unet_[a-z0-9_]+", key)
        if family == "sdxl":
            assert re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_\d", key), key
        else:
            assert key == "lora_unet_" + path.replace(".", "_")
        assert F.kohya_to_unet_module(key, family, cfg) == path


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_every_parameterised_module_inverts(full_unets, family):
    unet = full_unets[family]
    paths = [n for n, m in unet.named_modules() if n and next(m.parameters(recurse=False), None) is not None]
    keys = [F.unet_module_to_kohya(p, family, unet.config) for p in paths]
    assert len(set(keys)) == len(keys)
    assert [F.kohya_to_unet_module(k, family, unet.config) for k in keys] == paths


def test_layers_per_block_1_tree_inverts():
    cfg = {**SDXL_TINY, "layers_per_block": 1}
    unet = UNet2DConditionModel(**cfg)
    paths = list(_targets(unet, locon=True))
    keys = [F.unet_module_to_kohya(p, "sdxl", cfg) for p in paths]
    assert len(set(keys)) == len(keys)
    assert [F.kohya_to_unet_module(k, "sdxl", cfg) for k in keys] == paths


# --- Block index (sd-scripts networks/lora.py get_block_index) ---


def _expected_block_sd15(path: str) -> int:
    # IN00..IN11 = 0..11, MID = 12, OUT00..OUT11 = 13..24; 3 slots per block.
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)", path)
    if m:
        i, j = int(m.group(2)), int(m.group(4))
        slot = 3 * i + (2 if m.group(3).endswith("samplers") else j)
        return 1 + slot if m.group(1) == "down" else 13 + slot
    return 12 if path.startswith("mid_block.") else -1


def _expected_block_sdxl(key: str) -> int:
    # BASE = 0, IN00..IN08 = 1..9, MID 0..2 = 10..12, OUT00..OUT08 = 13..21, OUT = 22.
    name = key[len("lora_unet_") :]
    if name.startswith(("time_embed_", "label_emb_")):
        return 0
    if name.startswith("out_"):
        return 22
    head, n = re.match(r"(input_blocks|middle_block|output_blocks)_(\d+)", name).groups()
    return {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}[head] + int(n)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_block_index_matches_kohya(full_unets, family):
    unet, cfg = full_unets[family], full_unets[family].config
    assert F.lora_block_count(family, cfg) == (25 if family == "sd15" else 23)
    paths = [n for n, m in unet.named_modules() if n and next(m.parameters(recurse=False), None) is not None]
    for path in paths:
        key = F.unet_module_to_kohya(path, family, cfg)
        expected = _expected_block_sd15(path) if family == "sd15" else _expected_block_sdxl(key)
        assert F.lora_block_index(path, family, cfg) == expected, path
        assert F.lora_block_index(key, family, cfg) == expected, key
    used = {F.lora_block_index(p, family, cfg) for p in _targets(unet, locon=True)}
    assert used == (set(range(1, 25)) if family == "sd15" else set(range(2, 22)))


BLOCK_EXAMPLES = {
    "sd15": {"down_blocks.0.attentions.0.proj_in": 1, "down_blocks.0.downsamplers.0.conv": 3,
             "mid_block.resnets.1.conv1": 12, "up_blocks.0.upsamplers.0.conv": 15,
             "up_blocks.3.attentions.2.proj_out": 24, "conv_in": -1,
             "lora_te_text_model_encoder_layers_0_mlp_fc1": -1},
    "sdxl": {"time_embedding.linear_1": 0, "down_blocks.1.attentions.0.proj_in": 5,
             "mid_block.attentions.0.proj_in": 11, "up_blocks.0.upsamplers.0.conv": 15,
             "up_blocks.2.resnets.2.conv2": 21, "conv_out": 22, "not.a.module": -1},
}  # fmt: skip


@pytest.mark.parametrize("family,path,idx", [(f, p, i) for f, d in BLOCK_EXAMPLES.items() for p, i in d.items()])
def test_block_index_examples(family, path, idx):
    assert F.lora_block_index(path, family, SD15 if family == "sd15" else SDXL) == idx


# --- Text encoders ---

CLIP_L = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
CLIP_G = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20)
CLIP_TINY = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)


def _te_targets(te) -> list[str]:
    return [n for n, m in te.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]


@pytest.mark.parametrize(
    "cls,config,prefix,count",
    [
        (CLIPTextModel, CLIP_L, "lora_te", 72),
        (CLIPTextModel, CLIP_L, "lora_te1", 72),
        (CLIPTextModelWithProjection, CLIP_G, "lora_te2", 192),
    ],
)
def test_full_size_text_encoder_keys(cls, config, prefix, count):
    with init_empty_weights():
        te = cls(config)
    paths = _te_targets(te)
    assert len(paths) == count
    keys = [F.te_module_path_to_kohya(p, prefix) for p in paths]
    assert len(set(keys)) == count
    for path, key in zip(paths, keys):
        assert key.startswith(f"{prefix}_text_model_encoder_layers_")
        p, layer, proj = F.kohya_to_te_module(key)
        assert (p, F.te_module_to_kohya(layer, proj, p)) == (prefix, key)
        assert path.endswith(f"encoder.layers.{layer}.{proj}")


def test_text_encoder_live_paths_and_forms():
    # transformers 5: CLIPTextModel is flattened, CLIPTextModelWithProjection is not.
    with init_empty_weights():
        assert _te_targets(CLIPTextModel(CLIP_TINY))[0].startswith("encoder.layers.0.")
        assert _te_targets(CLIPTextModelWithProjection(CLIP_TINY))[0].startswith("text_model.encoder.layers.0.")
    want = "lora_te1_text_model_encoder_layers_3_self_attn_q_proj"
    assert F.te_module_to_kohya(3, "self_attn.q_proj", "lora_te1") == want
    assert F.te_module_path_to_kohya("encoder.layers.3.self_attn.q_proj", "lora_te1") == want
    assert F.te_module_path_to_kohya("text_model.encoder.layers.3.self_attn.q_proj", "lora_te1") == want
    assert F.te_module_to_kohya(11, "mlp.fc2", "lora_te") == "lora_te_text_model_encoder_layers_11_mlp_fc2"
    got = F.kohya_to_te_module("lora_te2_encoder_layers_5_self_attn_out_proj.alpha")
    assert got == ("lora_te2", 5, "self_attn.out_proj")
    for bad in [(0, "self_attn.qkv", "lora_te"), (0, "mlp.fc1", "lora_te3"), (-1, "mlp.fc1", "lora_te")]:
        with pytest.raises(ValueError):
            F.te_module_to_kohya(*bad)
    with pytest.raises(ValueError, match="embeddings"):
        F.te_module_path_to_kohya("text_model.embeddings.token_embedding", "lora_te")


# --- kohya <-> peft ---


def _random_kohya(modules: dict[str, torch.nn.Module], names: dict[str, str], rank: int, alpha: float | None, gen):
    sd = {}
    for path, m in modules.items():
        stem = names[path]
        if isinstance(m, torch.nn.Conv2d):
            down = torch.randn(rank, m.in_channels, *m.kernel_size, generator=gen)
            up = torch.randn(m.out_channels, rank, 1, 1, generator=gen)
        else:
            down = torch.randn(rank, m.in_features, generator=gen)
            up = torch.randn(m.out_features, rank, generator=gen)
        sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"] = down, up
        if alpha is not None:
            sd[f"{stem}.alpha"] = torch.tensor(alpha)
    return sd


def _deltas(sd: dict) -> dict[str, torch.Tensor]:
    """Effective delta alpha/rank * up @ down per kohya module (alpha missing: rank)."""
    out = {}
    for key, down in sd.items():
        if key.endswith(".lora_down.weight"):
            stem, r = key[: -len(".lora_down.weight")], down.shape[0]
            scale = float(sd.get(stem + ".alpha", r)) / r
            out[stem] = scale * (sd[stem + ".lora_up.weight"].flatten(1) @ down.flatten(1))
    return out


@pytest.fixture(scope="module")
def tiny():
    return {
        "sdxl": (UNet2DConditionModel(**SDXL_TINY), CLIPTextModel(CLIP_TINY), CLIPTextModelWithProjection(CLIP_TINY)),
        "sd15": (UNet2DConditionModel(**SD15_TINY), CLIPTextModel(CLIP_TINY), None),
    }


def _kohya_names(family, unet, te1, te2, locon=True):
    modules, names = {}, {}
    for p, m in _targets(unet, locon).items():
        modules["unet." + p], names["unet." + p] = m, F.unet_module_to_kohya(p, family, unet.config)
    prefixes = [("te1", te1, "lora_te" if family == "sd15" else "lora_te1"), ("te2", te2, "lora_te2")]
    for tag, te, prefix in prefixes:
        if te is not None:
            for p in _te_targets(te):
                modules[f"{tag}.{p}"], names[f"{tag}.{p}"] = te.get_submodule(p), F.te_module_path_to_kohya(p, prefix)
    return modules, names


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("alpha", [None, 4.0, 1.0])
def test_round_trips(tiny, family, alpha):
    unet, te1, te2 = tiny[family]
    rank, gen = 4, torch.Generator().manual_seed(1)
    kohya = _random_kohya(*_kohya_names(family, unet, te1, te2), rank, alpha, gen)
    peft, alphas = F.kohya_to_peft(kohya, family, unet.config)
    assert len(peft) == len(kohya) // (3 if alpha is not None else 2) * 2
    assert set(alphas.values()) == {alpha if alpha is not None else float(rank)}
    assert all(k.startswith(("unet.", "text_encoder.text_model.", "text_encoder_2.text_model.")) for k in peft)
    back = F.peft_to_kohya(peft, family, unet.config)
    kd, bd = _deltas(kohya), _deltas(back)
    assert kd.keys() == bd.keys()
    for stem in kd:
        torch.testing.assert_close(bd[stem], kd[stem], rtol=1e-5, atol=1e-5)
        assert back[stem + ".alpha"].dim() == 0
    if alpha in (None, float(rank)):  # no scale to bake: bit-exact both ways
        for key, value in kohya.items():
            assert torch.equal(back[key], value), key
    # restoring the original alphas from kohya_to_peft's dict
    restored = F.peft_to_kohya(peft, family, unet.config, alpha=alphas)
    for key, value in kohya.items():
        torch.testing.assert_close(restored[key], value, rtol=1e-6, atol=1e-6)
    # peft -> kohya -> peft is exact
    again, _ = F.kohya_to_peft(back, family, unet.config)
    assert again.keys() == peft.keys() and all(torch.equal(again[k], peft[k]) for k in peft)


def test_peft_to_kohya_with_alpha_keeps_delta(tiny):
    unet, te1, _ = tiny["sd15"]
    kohya = _random_kohya(*_kohya_names("sd15", unet, te1, None), 4, None, torch.Generator().manual_seed(2))
    peft, _ = F.kohya_to_peft(kohya, "sd15", unet.config)
    out = F.peft_to_kohya(peft, "sd15", unet.config, alpha=1.0)
    assert {float(v) for k, v in out.items() if k.endswith(".alpha")} == {1.0}
    kd, od = _deltas(kohya), _deltas(out)  # kohya had no alpha: scale 1
    assert kd.keys() == od.keys()
    for stem, delta in kd.items():
        torch.testing.assert_close(od[stem], delta, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="alpha"):
        F.peft_to_kohya(peft, "sd15", unet.config, alpha=0.0)


def _pair(stem: str) -> dict[str, torch.Tensor]:
    return {f"{stem}.lora_down.weight": torch.zeros(4, 32), f"{stem}.lora_up.weight": torch.zeros(37, 4)}


@pytest.mark.parametrize(
    "family,bad",
    [
        ("sd15", {"lora_unet_conv_in.dora_scale": torch.zeros(1)}),
        ("sd15", {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32, 1, 1)}),
        ("sd15", _pair("lora_te1_text_model_encoder_layers_0_mlp_fc1")),  # te1 on SD1.5
        ("sdxl", _pair("lora_te_text_model_encoder_layers_0_mlp_fc1")),  # lora_te_ on SDXL
        ("sd15", _pair("foo")),
        ("sd15", {**_pair("lora_unet_conv_in"), "lora_unet_conv_in.alpha": torch.tensor(0.0)}),
    ],
)
def test_kohya_to_peft_rejects(family, bad):
    with pytest.raises(ValueError):
        F.kohya_to_peft(bad, family, SD15_TINY if family == "sd15" else SDXL_TINY)


# --- diffusers accepts what kohya_to_peft writes ---


@pytest.mark.parametrize("family,locon", [("sd15", False), ("sdxl", False), ("sdxl", True)])
def test_diffusers_loads_peft_layout(family, locon):
    cfg = SDXL_TINY if family == "sdxl" else SD15_TINY
    unet = UNet2DConditionModel(**cfg)
    modules, names = _kohya_names(family, unet, None, None, locon=locon)
    kohya = _random_kohya(modules, names, 4, 2.0, torch.Generator().manual_seed(3))
    peft, _ = F.kohya_to_peft(kohya, family, unet.config)
    unet.load_lora_adapter(peft, prefix="unet", adapter_name="t")
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer)}
    assert len(layers) == len(modules) == len(kohya) // 3
    for path, layer in layers.items():  # same effective delta as the kohya file
        stem = names["unet." + path]
        down, up = kohya[f"{stem}.lora_down.weight"], kohya[f"{stem}.lora_up.weight"]
        want = 0.5 * (up.flatten(1) @ down.flatten(1))
        torch.testing.assert_close(layer.get_delta_weight("t").flatten(1), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "cls,prefix,component",
    [(CLIPTextModel, "lora_te1", "text_encoder"), (CLIPTextModelWithProjection, "lora_te2", "text_encoder_2")],
)
def test_diffusers_loads_text_encoder_peft_layout(cls, prefix, component):
    te = cls(CLIP_TINY)
    paths = _te_targets(te)
    names = {p: F.te_module_path_to_kohya(p, prefix) for p in paths}
    kohya = _random_kohya({p: te.get_submodule(p) for p in paths}, names, 4, 8.0, torch.Generator().manual_seed(4))
    peft, _ = F.kohya_to_peft(kohya, "sdxl", SDXL_TINY)
    assert all(k.startswith(f"{component}.text_model.encoder.layers.") for k in peft)
    StableDiffusionXLPipeline.load_lora_into_text_encoder(peft, None, te, prefix=component, adapter_name="t")
    layers = {n: m for n, m in te.named_modules() if isinstance(m, LoraLayer)}
    assert sorted(layers) == sorted(paths) and len(layers) == 12
    for path, layer in layers.items():
        stem = names[path]
        want = 2.0 * kohya[f"{stem}.lora_up.weight"] @ kohya[f"{stem}.lora_down.weight"]
        torch.testing.assert_close(layer.get_delta_weight("t"), want, rtol=1e-5, atol=1e-5)
