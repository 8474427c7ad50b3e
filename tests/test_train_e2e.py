"""End to end: train_network.py on the tiny models, then the file in diffusers."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_network
from tools.make_demo_dataset import make_dataset, make_reg_images


def read_scalars(logdir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    runs = [p for p in logdir.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    acc = EventAccumulator(str(runs[0]))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def train(tmp_path: Path, model_dir: Path, *extra: str, steps: int = 4) -> tuple[int, Path]:
    data = tmp_path / "data"
    if not data.exists():
        make_dataset(data, count=4, size=64, seed=1, repeats=2)
    out = tmp_path / "out"
    rc = train_network.main([
        "--pretrained_model_name_or_path", str(model_dir), "--train_data_dir", str(data),
        "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", str(steps),
        "--network_dim", "4", "--learning_rate", "1e-3", "--seed", "0",
        "--output_dir", str(out), "--output_name", "t", "--logging_dir", str(tmp_path / "logs"),
        *extra])
    return rc, out


def lora_layers(module) -> int:
    return sum(1 for _, m in module.named_modules()
               if hasattr(m, "lora_A") and len(getattr(m, "lora_A")) > 0)


def modules_in(sd: dict, prefix: str) -> int:
    return len({k.split(".")[0] for k in sd if k.startswith(prefix + "_")})


def unet_out(unet, family: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, cfg.cross_attention_dim, generator=g)
    kwargs = {}
    if family == "sdxl":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, 32, generator=g),
            "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        return unet(x, 10, ctx, **kwargs).sample


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_train_then_load_in_diffusers(family, tmp_path, tiny_sd15_dir, tiny_sdxl_dir):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    model_dir = tiny_sd15_dir if family == "sd15" else tiny_sdxl_dir
    rc, out = train(tmp_path, model_dir)
    assert rc == 0
    lora_file = out / "t.safetensors"
    assert lora_file.is_file() and (out / "t.toml").is_file()

    scalars = read_scalars(tmp_path / "logs")
    assert len(scalars["loss/current"]) == 4
    assert all(math.isfinite(v) for v in scalars["loss/current"])
    assert {"loss/average", "lr/unet", "lr/textencoder"} <= set(scalars)

    sd = load_file(str(lora_file))
    ups = [v for k, v in sd.items() if k.endswith("lora_up.weight")]
    assert ups and any(v.abs().sum() > 0 for v in ups), "training left lora_up at zero"

    cls = StableDiffusionPipeline if family == "sd15" else StableDiffusionXLPipeline
    pipe = cls.from_pretrained(model_dir)
    before = unet_out(pipe.unet, family)
    pipe.load_lora_weights(str(out), weight_name="t.safetensors")
    # every module in the file was applied: one peft LoRA layer per file module
    assert lora_layers(pipe.unet) == modules_in(sd, "lora_unet")
    te_prefixes = ["lora_te"] if family == "sd15" else ["lora_te1", "lora_te2"]
    encoders = [pipe.text_encoder] if family == "sd15" else [pipe.text_encoder,
                                                             pipe.text_encoder_2]
    for te, prefix in zip(encoders, te_prefixes):
        assert modules_in(sd, prefix) > 0
        assert lora_layers(te) == modules_in(sd, prefix)
    after = unet_out(pipe.unet, family)
    assert not torch.allclose(before, after)


def test_diffusers_layout_and_unet_only(tmp_path, tiny_sd15_dir):
    from diffusers import StableDiffusionPipeline
    rc, out = train(tmp_path, tiny_sd15_dir, "--save_model_as", "diffusers",
                    "--network_train_unet_only", "--cache_text_encoder_outputs",
                    "--cache_latents", steps=2)
    assert rc == 0
    f = out / "pytorch_lora_weights.safetensors"
    sd = load_file(str(f))
    assert all(k.startswith("unet.") for k in sd)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir)
    pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    assert lora_layers(pipe.unet) == len({k.rsplit(".lora_", 1)[0] for k in sd})
    assert lora_layers(pipe.text_encoder) == 0


def test_existing_output_is_not_overwritten(tmp_path, tiny_sd15_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "t.safetensors").write_bytes(b"precious")
    rc, _ = train(tmp_path, tiny_sd15_dir, steps=1)
    assert rc == 2
    assert (out / "t.safetensors").read_bytes() == b"precious"


def test_bad_image_stops_before_training(tmp_path, tiny_sd15_dir, capsys):
    data = tmp_path / "data"
    make_dataset(data, count=2, size=64)
    bad = data / "10_zorblat toy" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    rc, out = train(tmp_path, tiny_sd15_dir, steps=1)
    assert rc == 2
    assert "broken.png" in capsys.readouterr().err
    assert not out.exists()
    rc, out = train(tmp_path, tiny_sd15_dir, "--skip_bad_images", steps=1)
    assert rc == 0


def test_config_error_exit_code(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[optimizer]\nlearning_rat = 1e-4\n")
    assert train_network.main(["--config_file", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "bad.toml: [optimizer] learning_rat: unknown key (did you mean learning_rate?)" in err


def test_same_seed_same_losses(tmp_path, tiny_sd15_dir):
    rc, _ = train(tmp_path / "a", tiny_sd15_dir, steps=3)
    rc2, _ = train(tmp_path / "b", tiny_sd15_dir, steps=3)
    assert rc == rc2 == 0
    a = read_scalars(tmp_path / "a" / "logs")["loss/current"]
    b = read_scalars(tmp_path / "b" / "logs")["loss/current"]
    assert a == b


def test_demo_config_lora_loads_in_diffusers_with_every_key(tmp_path):
    """`make demo`'s config on the committed tiny model (a few steps), then the guide's
    diffusers snippet: every module of the file becomes a peft layer and changes the UNet."""
    from diffusers import StableDiffusionPipeline
    repo = Path(__file__).resolve().parent.parent
    model = repo / "models" / "tiny-sd15-pretrained"
    make_dataset(tmp_path / "data", count=4, size=32)
    make_reg_images(tmp_path / "reg", count=4, size=32)
    out = tmp_path / "out"
    assert train_network.main([
        "--config_file", str(repo / "configs" / "examples" / "tiny_demo.toml"),
        "--train_data_dir", str(tmp_path / "data"), "--reg_data_dir", str(tmp_path / "reg"),
        "--output_dir", str(out),
        "--logging_dir", str(tmp_path / "logs"), "--max_train_steps", "3",
        "--sample_prompts", "none", "--save_every_n_steps", "100000"]) == 0
    sd = load_file(str(out / "zorblat.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(model)
    before = unet_out(pipe.unet, "sd15")
    pipe.load_lora_weights(str(out), weight_name="zorblat.safetensors")
    assert modules_in(sd, "lora_unet") > 0 and modules_in(sd, "lora_te") > 0
    assert lora_layers(pipe.unet) == modules_in(sd, "lora_unet")
    assert lora_layers(pipe.text_encoder) == modules_in(sd, "lora_te")
    assert not torch.allclose(before, unet_out(pipe.unet, "sd15"))
