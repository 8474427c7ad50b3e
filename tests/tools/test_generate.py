"""tools/generate.py and tools/generate_reg_images.py on the tiny SD1.5 model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from library.models.loading import load_components
from networks.formats import kohya_to_peft
from networks.kohya_file import write_lora
from networks.lora import LoRANetwork
from networks.targets import RankSpec, find_targets
from tools.generate import generate, load, main, parse_lora_arg
from tools.generate_reg_images import generate_reg_images

PROMPT = dict(prompt="zorblat, a purple star", steps=2, width=64, height=64, seed=3,
              sampler="euler_a")


@pytest.mark.parametrize("text,expected", [
    ("a.safetensors:0.8", ("a.safetensors", 0.8)),
    ("a.safetensors", ("a.safetensors", 1.0)),
    ("dir/a.safetensors:-.5", ("dir/a.safetensors", -0.5)),
    ("C:/loras/a.safetensors", ("C:/loras/a.safetensors", 1.0)),
    ("C:/loras/a.safetensors:1e-1", ("C:/loras/a.safetensors", 0.1)),
])
def test_parse_lora_arg(text, expected):
    assert parse_lora_arg(text) == expected


def random_lora(model_dir: Path, ranks: RankSpec, train_te: bool, seed: int) -> dict:
    c = load_components(str(model_dir))
    targets = find_targets(c.unet, c.text_encoders, c.family.te_prefixes, c.family.name,
                           ranks, train_unet=True, train_text_encoder=train_te)
    net = LoRANetwork(targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net:
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.05)
    return net.kohya_state_dict(torch.float32), dict(c.unet.config)


def two_loras(model_dir: Path, family: str, d: Path) -> tuple[Path, Path]:
    """A kohya-layout LoRA (UNet + text encoders, alpha != rank) and a diffusers/peft-layout
    one (UNet only, rank 2)."""
    sd, unet_config = random_lora(model_dir, RankSpec(4, 2.0), True, seed=1)
    write_lora(d / "kohya.safetensors", sd, {"ss_network_dim": "4"})
    sd, _ = random_lora(model_dir, RankSpec(2, None), False, seed=2)
    peft, _ = kohya_to_peft(sd, family, unet_config)
    write_lora(d / "pytorch_lora_weights.safetensors",
               {k: v.contiguous() for k, v in peft.items()}, {})
    return d / "kohya.safetensors", d / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_two_loras_match_diffusers_adapters(family, tiny_sd15_dir, tiny_sdxl_dir, tmp_path):
    from diffusers import DiffusionPipeline
    from PIL import Image

    from library.train.samplers import make_scheduler
    model_dir = tiny_sd15_dir if family == "sd15" else tiny_sdxl_dir
    a, b = two_loras(model_dir, family, tmp_path)
    loras = [(str(a), 0.8), (str(b), 0.5)]
    loaded = load(str(model_dir), loras, device="cpu")
    ours = generate(str(model_dir), loras=loras, loaded=loaded, out_dir=tmp_path / "out",
                    **PROMPT)
    assert len(ours) == 1 and ours[0].path.name == "00000-3.png"
    text = Image.open(ours[0].path).text["parameters"]
    assert text.startswith("zorblat, a purple star\nSteps: 2, Sampler: Euler a, CFG scale: 7.5, "
                           "Seed: 3, Size: 64x64")
    assert 'LoRAs: "kohya:0.8, pytorch_lora_weights:0.5"' in text

    pipe = DiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler("euler_a", pipe.scheduler.config)
    pipe.load_lora_weights(str(a.parent), weight_name=a.name, adapter_name="a")
    pipe.load_lora_weights(str(b.parent), weight_name=b.name, adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.8, 0.5])
    ref = pipe(PROMPT["prompt"], num_inference_steps=2, guidance_scale=7.5, width=64, height=64,
               generator=torch.Generator("cpu").manual_seed(3), output_type="np").images[0]
    assert np.allclose(ours[0].array, ref, atol=2e-4), np.abs(ours[0].array - ref).max()

    # batching gives the same images per seed; a second run appends, never overwrites
    two = generate(str(model_dir), loras=loras, loaded=loaded, n=2, batch=2,
                   out_dir=tmp_path / "out", **PROMPT)
    assert [r.path.name for r in two] == ["00001-3.png", "00002-4.png"]
    assert np.allclose(two[0].array, ours[0].array, atol=1e-5)

    # the LoRAs do change the image, and detaching restores the base model
    for net in reversed(loaded[3]):
        net.detach()
    base = generate(str(model_dir), loaded=loaded, **PROMPT)
    pipe.disable_lora()
    ref_base = pipe(PROMPT["prompt"], num_inference_steps=2, guidance_scale=7.5, width=64,
                    height=64, generator=torch.Generator("cpu").manual_seed(3),
                    output_type="np").images[0]
    assert np.abs(base[0].array - ours[0].array).max() > 1e-3
    assert np.allclose(base[0].array, ref_base, atol=2e-4)


def test_generate_cli_errors(tmp_path, capsys):
    assert main(["--model", str(tmp_path)]) == 2
    assert "exactly one of --prompt and --prompt_file" in capsys.readouterr().err
    assert main(["--model", str(tmp_path), "--prompt", "x", "--lora", "missing.safetensors:0.5"
                 ]) == 2
    assert "--lora: missing.safetensors not found" in capsys.readouterr().err
    assert main(["--model", str(tmp_path), "--prompt", "x", "--sampler", "warp"]) == 2
    assert "unknown sampler 'warp'" in capsys.readouterr().err


def test_reg_images_are_resumable(tiny_sd15_dir, tmp_path):
    from PIL import Image
    out = tmp_path / "reg" / "1_person"
    kw = dict(steps=1, width=64, height=64, seed=5, progress=False)
    written = generate_reg_images(str(tiny_sd15_dir), "person", 2, out, **kw)
    assert [p.name for p in written] == ["000000.png", "000001.png"]
    assert (out / "000001.txt").read_text() == "person\n"
    assert "Seed: 6," in Image.open(out / "000001.png").text["parameters"]
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / "000000.png").unlink()  # a lost image is regenerated with its own seed
    (out / "000000.txt").unlink()
    written = generate_reg_images(str(tiny_sd15_dir), "person", 3, out, **kw, batch=2)
    assert [p.name for p in written] == ["000000.png", "000002.png"]
    assert sorted(p.name for p in out.iterdir()) == [
        f"{i:06d}.{ext}" for i in range(3) for ext in ("png", "txt")]
    for name in ("000001.png", "000001.txt"):
        assert (out / name).stat().st_mtime_ns == stamps[name]
    assert generate_reg_images(str(tiny_sd15_dir), "person", 3, out, **kw) == []
