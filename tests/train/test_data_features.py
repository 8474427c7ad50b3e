"""kohya data features in the training step, on the tiny SD1.5 model: masks from
conditioning_data_dir weight the loss (no gradient from masked-out pixels), a dataset's
network_multiplier 0 gives the LoRA no gradient, and one tiny run with all of them
(weighted_captions, masked_loss, per-dataset multiplier and validation split) trains."""
from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from library.data.prepare import build_group, prepare_data
from library.models.loading import load_components
from library.train.conditioning import TextConditioner
from library.train.step import LossSettings, diffusion_loss, set_batch_multiplier
from networks.lora import LoRANetwork
from networks.targets import RankSpec, find_targets
from tests.data.conftest import dataset_config, write_folder
from tests.test_train_e2e import read_scalars, train


def write_masks(folder, names, size=64):
    """Masks whose red channel is 0 on the left half and 255 on the right."""
    folder.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size, size, 3), dtype=np.uint8)
    arr[:, size // 2:, 0] = 255
    for n in names:
        Image.fromarray(arr).save(folder / f"{n}.png")


def write_toml(root):
    write_folder(root / "a", 4, caption="zorblat, (purple:1.3) star, [blurry]")
    write_masks(root / "masks", ["000", "001", "002", "003"])
    write_folder(root / "b", 2, caption="a red circle")
    path = root / "data.toml"
    path.write_text(textwrap.dedent("""
        [general]
        resolution = 64
        batch_size = 2
        [[datasets]]
        validation_split = 0.25
        validation_seed = 3
          [[datasets.subsets]]
          image_dir = "a"
          conditioning_data_dir = "masks"
        [[datasets]]
        network_multiplier = 0.0
          [[datasets.subsets]]
          image_dir = "b"
    """), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def c(tiny_sd15_dir):
    return load_components(str(tiny_sd15_dir))


@pytest.fixture
def group(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = dataset_config(dataset_config=write_toml(tmp_path), masked_loss=True,
                       weighted_captions=True)
    data = prepare_data(d, (64, 64))
    assert data.problems == []
    return build_group(data, seed=0)[0]


def first_batch(group, dataset: int) -> dict:
    b = next(b for b in group.batches(0) if group.locate(b[0])[0] == dataset)
    return group.collate(b, 0, 0)


def loss_of(c, batch, latents=None):
    cond = TextConditioner(c, c.family, 1, False, keep_cache=False, weighted=True)(
        batch["captions"])
    if latents is None:
        latents = torch.randn(len(batch["captions"]), 4, 8, 8,
                              generator=torch.Generator().manual_seed(0))
    return diffusion_loss(c.unet, c.family, c.noise_scheduler, latents, cond, batch,
                          LossSettings())


def test_masked_out_pixels_give_no_gradient(c, group):
    batch = first_batch(group, 0)
    assert torch.all(batch["alpha_mask"][:, :, :, :4] == 0)
    assert torch.all(batch["alpha_mask"][:, :, :, 4:] == 1)
    seen = {}

    def keep_output(module, args, out):
        out.sample.retain_grad()
        seen["pred"] = out.sample
    handle = c.unet.register_forward_hook(keep_output)
    try:
        loss_of(c, batch).backward()
    finally:
        handle.remove()
    grad = seen["pred"].grad
    assert torch.all(grad[:, :, :, :4] == 0)          # left half: masked out
    assert torch.all(grad[:, :, :, 4:].abs().sum((1, 2, 3)) > 0)
    # the loss is the masked formula: mean over all pixels of mask x squared error, so
    # doubling the error where the mask is 0 changes nothing
    with torch.no_grad():
        ones = dict(batch, alpha_mask=torch.ones_like(batch["alpha_mask"]))
        assert loss_of(c, batch) < loss_of(c, ones)


def test_network_multiplier_zero_gives_the_lora_no_gradient(c, group):
    targets = find_targets(c.unet, c.text_encoders, c.family.te_prefixes, c.family.name,
                           RankSpec(4, 4.0), train_unet=True, train_text_encoder=False)
    net = LoRANetwork(targets)
    with torch.no_grad():
        for m in net:
            m.lora_up.weight.normal_(0, 0.1)
    net.attach()
    try:
        grads = {}
        for k in (0, 1):
            batch = first_batch(group, k)
            set_batch_multiplier(net, batch)
            net.zero_grad(set_to_none=True)
            loss_of(c, batch).backward()
            grads[k] = sum(float(p.grad.abs().sum()) for p in net.parameters()
                           if p.grad is not None)
        assert grads[0] > 0 and grads[1] == 0.0
        assert all(m.multiplier == 0.0 for m in net)
    finally:
        net.detach()


def test_tiny_run_with_every_data_feature(tmp_path, tiny_sd15_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_toml(tmp_path)
    rc, out = train(tmp_path, tiny_sd15_dir, "--dataset_config", str(path), "--masked_loss",
                    "--weighted_captions", "--network_train_unet_only",
                    "--cache_text_encoder_outputs", "true", "--validate_every_n_steps", "2",
                    steps=4)
    assert rc == 0
    assert (out / "t.safetensors").is_file()
    scalars = read_scalars(tmp_path / "logs")
    assert len(scalars["loss/current"]) == 4 and all(np.isfinite(scalars["loss/current"]))
    assert len(scalars["loss/validation"]) == 2
