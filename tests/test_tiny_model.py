"""Tests for tools/make_tiny_model.py: offline tiny pipelines that load and run in diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tools.make_tiny_model import WORDS, build_tiny_model, folder_size, main

SD15_FILES = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]
SDXL_FILES = SD15_FILES + [
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors",
    "tokenizer_2/vocab.json",
    "tokenizer_2/merges.txt",
    "tokenizer_2/tokenizer_config.json",
]


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def sd15_pipe(tiny_sd15_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_sd15_dir, local_files_only=True)


@pytest.fixture(scope="module")
def sdxl_pipe(tiny_sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, local_files_only=True)


def test_layout_and_size(tiny_sd15_dir, tiny_sdxl_dir):
    for root, expected in ((tiny_sd15_dir, SD15_FILES), (tiny_sdxl_dir, SDXL_FILES)):
        present = set(_files(root))
        assert set(expected) <= present, set(expected) - present
        assert not any(name.endswith((".bin", ".pt", ".ckpt")) for name in present)
        assert folder_size(root) < 16_000_000
        # no leftover temporary siblings from the atomic write
        assert [p.name for p in root.parent.iterdir()] == [root.name]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_pipeline_runs(family, request):
    pipe = request.getfixturevalue(f"{family}_pipe")
    assert pipe.vae_scale_factor == 8
    out = pipe(
        "a red circle on a blue background",
        num_inference_steps=2,
        height=64,
        width=64,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    images = out.images
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()


def test_unet_not_degenerate(sd15_pipe):
    unet = sd15_pipe.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        y = unet(x, torch.tensor([10, 900]), encoder_hidden_states=ctx).sample
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert 0.05 < y.std().item() < 20.0
    assert not torch.allclose(y[0], y[1])


def test_tokenizer(sd15_pipe, sdxl_pipe):
    tok = sd15_pipe.tokenizer
    assert tok.model_max_length == 77
    ids = tok("a red circle on a blue background").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    words = "a red circle on a blue background".split()
    assert tok.convert_ids_to_tokens(ids[1:-1]) == [w + "</w>" for w in words]
    for word in WORDS:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    # arbitrary text (uppercase, digits, punctuation, accents, emoji) tokenizes without unknowns
    text = "Hello, WORLD! naïve café 123 — 😀 <x> mysubject"
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids and tok.unk_token_id not in ids
    assert tok.decode(ids).replace(" ", "") == text.lower().replace(" ", "")
    padded = tok("a photo of sks", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[-1] == tok.pad_token_id == tok.eos_token_id
    long_ids = tok("cat " * 200, truncation=True, max_length=77).input_ids
    assert len(long_ids) == 77 and long_ids[-1] == tok.eos_token_id
    # SDXL: both tokenizers share the vocab, the second pads with "!" like the real one
    assert sdxl_pipe.tokenizer.get_vocab() == sdxl_pipe.tokenizer_2.get_vocab() == tok.get_vocab()
    assert sdxl_pipe.tokenizer_2.pad_token == "!"
    assert sdxl_pipe.tokenizer.pad_token == "<|endoftext|>"


def test_text_encoders(sd15_pipe, sdxl_pipe, tiny_sd15_dir, tiny_sdxl_dir):
    vocab_size = len(sd15_pipe.tokenizer)
    assert sd15_pipe.text_encoder.config.vocab_size == vocab_size
    assert sd15_pipe.text_encoder.config.num_hidden_layers == 2
    assert sd15_pipe.text_encoder.config.hidden_act == "quick_gelu"
    assert sdxl_pipe.text_encoder.config.num_hidden_layers == 3
    assert sdxl_pipe.text_encoder_2.config.num_hidden_layers == 2
    assert sdxl_pipe.text_encoder_2.config.hidden_act == "gelu"
    assert sdxl_pipe.text_encoder_2.config.projection_dim == 32
    # on disk the weights use the `text_model.` prefix of real SD checkpoints
    for path in (
        tiny_sd15_dir / "text_encoder/model.safetensors",
        tiny_sdxl_dir / "text_encoder/model.safetensors",
        tiny_sdxl_dir / "text_encoder_2/model.safetensors",
    ):
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
        assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in keys, path
        assert all(k.startswith("text_model.") or k == "text_projection.weight" for k in keys)
    # ... and they load into the models unchanged (transformers 5 strips the prefix for
    # CLIPTextModel, which has no `text_model` submodule there; the projection model keeps it)
    from safetensors.torch import load_file

    for root, pipe, name in (
        (tiny_sd15_dir, sd15_pipe, "text_encoder"),
        (tiny_sdxl_dir, sdxl_pipe, "text_encoder"),
        (tiny_sdxl_dir, sdxl_pipe, "text_encoder_2"),
    ):
        saved = load_file(str(root / name / "model.safetensors"))
        live = getattr(pipe, name).state_dict()
        for key, value in saved.items():
            live_key = key if key in live else key.removeprefix("text_model.")
            assert torch.equal(live[live_key], value), (name, key)


def test_unet_structure(sd15_pipe, sdxl_pipe):
    sd15 = sd15_pipe.unet
    names = dict(sd15.named_modules())
    assert isinstance(names["down_blocks.0.attentions.0.proj_in"], torch.nn.Conv2d)
    assert "up_blocks.0.upsamplers.0.conv" in names  # UpBlock2D first, like SD1.5
    assert "up_blocks.3.upsamplers.0" not in names
    assert sd15.config.cross_attention_dim == 32

    xl = sdxl_pipe.unet
    names = dict(xl.named_modules())
    assert hasattr(xl, "add_embedding")
    assert isinstance(names["down_blocks.1.attentions.0.proj_in"], torch.nn.Linear)
    assert len(xl.down_blocks[2].attentions[0].transformer_blocks) == 2
    assert len(xl.down_blocks[1].attentions[0].transformer_blocks) == 1
    assert not hasattr(xl.down_blocks[0], "attentions")
    assert xl.add_embedding.linear_1.in_features == 32 + 6 * 8
    assert sdxl_pipe.vae.config.scaling_factor == pytest.approx(0.13025)
    assert sdxl_pipe.vae.config.force_upcast is True
    assert sd15_pipe.vae.config.scaling_factor == pytest.approx(0.18215)


def test_deterministic(tiny_sd15_dir, tmp_path):
    again = build_tiny_model("sd15", tmp_path / "again", seed=0)
    a, b = _files(tiny_sd15_dir), _files(again)
    assert a.keys() == b.keys()
    assert a["unet/diffusion_pytorch_model.safetensors"] == b["unet/diffusion_pytorch_model.safetensors"]
    assert a == b  # the whole folder, byte for byte
    other = build_tiny_model("sd15", tmp_path / "other", seed=1)
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert (other / unet).read_bytes() != a[unet]


def test_cli_refuses_and_forces(tmp_path, capsys):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["--family", "sd15", "--out", str(out)]) == 1
    assert (out / "keep.txt").exists()
    with pytest.raises(FileExistsError):
        build_tiny_model("sd15", out)
    assert main(["--family", "sd15", "--out", str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model_index.json").exists()
    assert "model_index.json" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    with pytest.raises(ValueError):
        build_tiny_model("sd3", tmp_path / "x")
