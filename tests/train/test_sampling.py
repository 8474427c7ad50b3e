"""Sampling during training (library/train/sampling.py): schedule, state preservation, and a
tiny training run that writes samples without changing its losses."""
from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from library.train.sampling import due, grid, lora_as_saved, preserved_rng
from networks.lora import LoRANetwork, Target
from tests.test_train_e2e import read_scalars, train


def sample_cfg(**kw):
    base = dict(sample_every_n_steps=None, sample_every_n_epochs=None, sample_at_first=False,
                validation_epochs=None)
    return SimpleNamespace(**{**base, **kw})


# (config, call, expected (file due, validation due))
DUE = [
    (dict(sample_every_n_steps=2), dict(step=2, epoch=1), (True, False)),
    (dict(sample_every_n_steps=2), dict(step=3, epoch=1), (False, False)),
    (dict(sample_every_n_steps=2), dict(step=0, epoch=0, first=True), (False, False)),
    (dict(sample_at_first=True), dict(step=0, epoch=0, first=True), (True, True)),
    # kohya: an epoch interval wins over a step interval
    (dict(sample_every_n_steps=2, sample_every_n_epochs=2), dict(step=2, epoch=1),
     (False, False)),
    (dict(sample_every_n_epochs=2), dict(step=8, epoch=2, epoch_end=True), (True, True)),
    (dict(sample_every_n_epochs=2), dict(step=4, epoch=1, epoch_end=True), (False, True)),
    (dict(validation_epochs=3), dict(step=4, epoch=2, epoch_end=True), (False, False)),
    (dict(validation_epochs=3), dict(step=4, epoch=3, epoch_end=True), (False, True)),
]


@pytest.mark.parametrize("config,call,expected", DUE)
def test_due(config, call, expected):
    step, epoch = call.pop("step"), call.pop("epoch")
    assert due(sample_cfg(**config), step, epoch, **call) == expected


def test_grid_pads_mixed_sizes():
    a = np.full((4, 6, 3), 10, np.uint8)
    b = np.full((2, 2, 3), 20, np.uint8)
    g = grid([a, b, a])
    assert g.shape == (8, 12, 3) and g.dtype == np.uint8
    assert (g[:4, :6] == 10).all() and (g[:2, 6:8] == 20).all() and (g[2:4, 6:] == 0).all()


def small_network(alpha: float) -> LoRANetwork:
    torch.manual_seed(0)
    bases = [nn.Linear(8, 8), nn.Conv2d(4, 4, 3, padding=1)]
    net = LoRANetwork([Target(f"lora_unet_m{i}", m, 4, alpha) for i, m in enumerate(bases)],
                      multiplier=0.6, dropout=0.1).attach()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return net


def test_lora_as_saved_rounds_then_restores_exactly():
    net = small_network(alpha=0.3)  # 0.3 is inexact in fp32 and fp16
    before = {k: v.clone() for k, v in net.state_dict().items()}
    attrs = [(m.multiplier, m.scale) for m in net]
    with lora_as_saved(net, torch.float16):
        for k, v in net.state_dict().items():
            assert torch.equal(v, before[k].half().float()), k
        assert all(m.multiplier == 1.0 for m in net)
        assert all(m.scale == float(torch.tensor(0.3).half()) / 4 for m in net)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [(m.multiplier, m.scale) for m in net] == attrs


def test_preserved_rng():
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    expected = (random.random(), np.random.rand(), torch.rand(()).item())
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    with preserved_rng():
        random.random(), np.random.rand(), torch.rand(3)
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == expected


def test_validation_prompts_use_consecutive_seeds():
    from library.train.sampling import validation_prompts
    cfg = SimpleNamespace(sample=SimpleNamespace(validation_prompt="a star",
                                                 num_validation_images=3,
                                                 sample_sampler="k_euler_a"))
    specs = validation_prompts(cfg, 1024, seed=7)
    assert [(p.prompt, p.seed, p.width, p.sampler) for p in specs] == [
        ("a star", s, 1024, "euler_a") for s in (7, 8, 9)]


def read_images(logdir: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = next(p for p in logdir.iterdir() if p.is_dir())
    acc = EventAccumulator(str(run), size_guidance={"images": 0})
    acc.Reload()
    return {tag: acc.Images(tag) for tag in acc.Tags()["images"]}


def test_training_writes_samples_and_keeps_losses(tmp_path, tiny_sd15_dir):
    from PIL import Image
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts, few steps\nzorblat, a purple star --w 64 --h 64 --s 2 "
                       "--d 1\na red circle --n blurry --w 128 --h 64 --s 2 --ss euler_a\n")
    common = ("--network_dropout", "0.1")  # dropout uses the global RNG sampling must restore
    rc, out = train(tmp_path / "with", tiny_sd15_dir, *common, "--sample_every_n_steps", "2",
                    "--sample_at_first", "--sample_prompts", str(prompts),
                    "--sample_sampler", "DDIM", steps=4)
    assert rc == 0
    rc, _ = train(tmp_path / "without", tiny_sd15_dir, *common, steps=4)
    assert rc == 0

    with_losses = read_scalars(tmp_path / "with" / "logs")["loss/current"]
    without_losses = read_scalars(tmp_path / "without" / "logs")["loss/current"]
    assert len(with_losses) == 4 and with_losses == without_losses

    names = sorted(p.name for p in (out / "sample").glob("*.png"))
    assert names == [f"t_s{s:06d}_e{e:03d}_{i:02d}.png"
                     for s, e in ((0, 0), (2, 1), (4, 1)) for i in (0, 1)]
    first = Image.open(out / "sample" / "t_s000002_e001_00.png")
    second = Image.open(out / "sample" / "t_s000002_e001_01.png")
    assert first.size == (64, 64) and second.size == (128, 64)
    assert first.text["parameters"].startswith(
        "zorblat, a purple star\nSteps: 2, Sampler: DDIM, CFG scale: 7.5, Seed: 1, "
        "Size: 64x64, Model: tiny-sd15")
    # no --d: training seed (0) + prompt index (1)
    assert second.text["parameters"].startswith(
        "a red circle\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a, CFG scale: 7.5, "
        "Seed: 1, Size: 128x64")
    # the same prompt and seed at step 0 (LoRA up = 0) and step 4 give different images
    at0 = np.asarray(Image.open(out / "sample" / "t_s000000_e000_00.png"))
    at4 = np.asarray(Image.open(out / "sample" / "t_s000004_e001_00.png"))
    assert at0.shape == at4.shape and not np.array_equal(at0, at4)

    images = read_images(tmp_path / "with" / "logs")
    assert [e.step for e in images["samples"]] == [0, 2, 4]
    assert (images["samples"][0].height, images["samples"][0].width) == (64, 256)


def test_bad_prompt_file_stops_before_models_load(tmp_path, tiny_sd15_dir, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ok\nbad --w huge\n")
    rc, out = train(tmp_path, tiny_sd15_dir, "--sample_every_n_steps", "2",
                    "--sample_prompts", str(prompts), steps=1)
    assert rc == 2
    assert f"{prompts}:2: --w 'huge': expected an integer from 8 to 4096" in capsys.readouterr().err
    assert not out.exists()


def test_sdxl_samples_at_epoch_end(tmp_path, tiny_sdxl_dir):
    from PIL import Image
    prompts = tmp_path / "prompts.toml"
    prompts.write_text('[[prompt]]\nprompt = "a star"\nnegative_prompt = "blurry"\n'
                       'width = 64\nheight = 64\nsample_steps = 2\n')
    rc, out = train(tmp_path, tiny_sdxl_dir, "--sample_every_n_epochs", "1",
                    "--sample_every_n_steps", "1", "--sample_prompts", str(prompts), steps=5)
    assert rc == 0
    # 4 images x 2 repeats / batch 2 = epochs of 4 steps; the epoch interval wins over the
    # step interval, so nothing is sampled at steps 1-3
    names = sorted(p.name for p in (out / "sample").glob("*.png"))
    assert "t_s000004_e001_00.png" in names
    assert not [n for n in names if n.startswith(("t_s000001", "t_s000002", "t_s000003"))]
    img = Image.open(out / "sample" / "t_s000004_e001_00.png")
    assert img.size == (64, 64) and "Model: tiny-sdxl" in img.text["parameters"]
