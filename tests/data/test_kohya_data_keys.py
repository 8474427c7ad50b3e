"""kohya data keys on real files: in_json + dataset_repeats, masked_loss with
conditioning_data_dir (train_data_dir and dataset TOML), per-dataset validation_split /
validation_seed and network_multiplier, the weighted_captions + shuffle warning."""
from __future__ import annotations

import json
import textwrap
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from library.config import ConfigError
from library.data.cache import cache_latents
from library.data.prepare import build_group, prepare_data
from library.train.validation import hold_out_for
from tests.data.conftest import dataset_config, write_folder, write_image

RES = (64, 64)


def _toml(folder, text: str):
    path = folder / "data.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# ---- in_json ------------------------------------------------------------------------------
def test_in_json_with_dataset_repeats(cwd):
    imgs = cwd / "imgs"
    write_image(imgs / "a.png")
    write_image(imgs / "b.jpg", size=(96, 64))
    write_image(imgs / "sub" / "c.png")
    meta = cwd / "meta.json"
    meta.write_text(json.dumps({
        "a": {"caption": "a red square", "tags": "red, square"},  # key without extension
        "b.jpg": {"tags": "wide, photo"},                           # tags only
        str(imgs / "sub" / "c.png"): {"caption": "absolute key"},   # a path as the key
    }), encoding="utf-8")
    d = dataset_config(train_data_dir=imgs, in_json=meta, dataset_repeats=3,
                       reg_data_dir=cwd)
    data = prepare_data(d, RES)
    assert data.problems == []
    got = {it.image.name: (it.caption, it.repeats, it.is_reg) for it in data.items}
    assert got == {"a.png": ("a red square, red, square", 3, False),
                   "b.jpg": ("wide, photo", 3, False), "c.png": ("absolute key", 3, False)}
    assert any("reg_data_dir is ignored with in_json" in w for w in data.warnings)
    assert data.source.startswith(f"in_json {meta}")
    group, _ = build_group(data, seed=0)
    assert len(group) == 9  # 3 images x dataset_repeats 3


def test_in_json_problems_name_the_file_and_key(cwd):
    write_image(cwd / "imgs" / "a.png")
    meta = cwd / "meta.json"
    meta.write_text(json.dumps({"a": {"caption": "x"}, "gone": {"caption": "y"}}))
    data = prepare_data(dataset_config(train_data_dir=cwd / "imgs", in_json=meta), RES)
    assert data.problems == [f"{meta}: image 'gone' not found (as a path or in image_dir "
                             f"{str(cwd / 'imgs')!r}); fix the key or set image_dir"]
    data = prepare_data(dataset_config(train_data_dir=cwd / "imgs", in_json="nope.json"), RES)
    assert data.problems[0] == "in_json: file 'nope.json' not found"


# ---- masked_loss ---------------------------------------------------------------------------
def write_mask(path, size=(64, 64), left_black: bool = True):
    """Red channel 0 on the left half, 255 on the right (green/blue the other way round, so
    reading any other channel would give the opposite mask)."""
    arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    arr[:, size[0] // 2:, 0] = 255
    arr[:, :size[0] // 2, 1:] = 255
    if not left_black:
        arr = arr[:, ::-1].copy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture
def masked(cwd):
    write_folder(cwd / "train" / "2_sks", 2, caption="sks")
    write_folder(cwd / "reg" / "1_person", 1, caption=None)
    write_mask(cwd / "masks" / "2_sks" / "000.png")
    write_mask(cwd / "masks" / "2_sks" / "001.jpg")
    return cwd


def test_masked_loss_reads_the_red_channel_with_the_crop(masked):
    d = dataset_config(train_data_dir=masked / "train", reg_data_dir=masked / "reg",
                       masked_loss=True, conditioning_data_dir=masked / "masks")
    data = prepare_data(d, RES)
    assert data.problems == []
    masks = {it.image.name: it.mask for it in data.items if not it.is_reg}
    assert masks == {"000.png": masked / "masks" / "2_sks" / "000.png",
                     "001.png": masked / "masks" / "2_sks" / "001.jpg"}
    reg = [it for it in data.items if it.is_reg]
    assert reg and all(it.mask is None for it in reg)
    group, _ = build_group(data, seed=0)
    ds = group.datasets[0]
    idx = next(i for i, it in enumerate(ds.items) if it.image.name == "000.png")
    sample = ds.sample(idx, 0, 0)
    mask = sample["alpha_mask"][0]
    assert mask.shape == (8, 8)
    assert torch.all(mask[:, :4] == 0) and torch.all(mask[:, 4:] == 1)
    reg_idx = next(i for i, it in enumerate(ds.items) if it.is_reg)
    assert torch.all(ds.sample(reg_idx, 0, 1)["alpha_mask"] == 1)  # reg trains everywhere


def test_mask_cache_carries_the_mask_and_keys_on_its_bytes(masked, tmp_path):
    d = dataset_config(train_data_dir=masked / "train", masked_loss=True,
                       conditioning_data_dir=masked / "masks", flip_aug=True)
    group, _ = build_group(prepare_data(d, RES), seed=0)
    encode = lambda px, seeds: torch.zeros(px.shape[0], 4, 8, 8)  # noqa: E731
    vae = SimpleNamespace(config={"scaling_factor": 0.18}, state_dict=lambda: {
        "w": torch.ones(2)})
    stats = cache_latents(group, encode, vae=vae, vae_dtype=torch.float32, to_disk=True,
                          cache_dir=str(tmp_path / "cache"), progress=False)
    assert stats.encoded == 4  # 2 images x (plain, flipped)
    ds = group.datasets[0]
    assert torch.all(ds.mask_cache[(0, False)][0, :, :4] == 0)
    assert torch.all(ds.mask_cache[(0, True)][0, :, 4:] == 0)  # the mask flips with the image
    fresh, _ = build_group(prepare_data(d, RES), seed=0)
    again = cache_latents(fresh, encode, vae=vae, vae_dtype=torch.float32, to_disk=True,
                          cache_dir=str(tmp_path / "cache"), progress=False)
    assert (again.from_disk, again.encoded) == (4, 0)
    assert torch.equal(fresh.datasets[0].mask_cache[(0, False)], ds.mask_cache[(0, False)])
    write_mask(masked / "masks" / "2_sks" / "000.png", left_black=False)  # an edited mask
    fresh, _ = build_group(prepare_data(d, RES), seed=0)
    edited = cache_latents(fresh, encode, vae=vae, vae_dtype=torch.float32, to_disk=True,
                           cache_dir=str(tmp_path / "cache"), progress=False)
    assert (edited.from_disk, edited.encoded) == (2, 2)


def test_missing_or_mis_sized_mask_is_a_data_error(masked):
    (masked / "masks" / "2_sks" / "001.jpg").unlink()
    write_mask(masked / "masks" / "2_sks" / "000.png", size=(32, 64))
    write_mask(masked / "masks" / "2_sks" / "stray.png")
    d = dataset_config(train_data_dir=masked / "train", masked_loss=True,
                       conditioning_data_dir=masked / "masks")
    data = prepare_data(d, RES)
    img = masked / "train" / "2_sks" / "001.png"
    assert data.problems == [  # every problem at once
        f"{img}: no mask image 001.* in {masked / 'masks' / '2_sks'} (conditioning_data_dir: "
        "masked_loss needs one per training image; add it, or move the image out)",
        f"{masked / 'masks' / '2_sks' / '000.png'}: mask is 32x64 but its image "
        f"{masked / 'train' / '2_sks' / '000.png'} is 64x64; masks must match their image's "
        "size"]
    assert any("stray.png" in w for w in data.warnings)
    assert prepare_data(replace(d, conditioning_data_dir=None), RES).problems == [
        "masked_loss = true but no masks: set conditioning_data_dir (a folder of mask images "
        "named like the training images) or alpha_mask = true"]


def test_dataset_toml_conditioning_data_dir(masked):
    path = _toml(masked, """
        [[datasets]]
        resolution = 64
          [[datasets.subsets]]
          image_dir = "train/2_sks"
          conditioning_data_dir = "masks/2_sks"
          [[datasets.subsets]]
          image_dir = "reg/1_person"
          is_reg = true
    """)
    with pytest.raises(ConfigError) as info:
        prepare_data(dataset_config(dataset_config=path), RES)
    assert info.value.problems == [
        f"{path}: [[datasets]] #1 [[datasets.subsets]] #1 conditioning_data_dir: mask images "
        "are used only with masked_loss = true (set it in the main config), or remove the key"]
    data = prepare_data(dataset_config(dataset_config=path, masked_loss=True), RES)
    assert data.problems == []
    assert sorted(str(it.mask.name) for it in data.items if it.mask) == ["000.png", "001.jpg"]


# ---- validation_split / validation_seed, network_multiplier --------------------------------
@pytest.fixture
def two_datasets(cwd):
    write_folder(cwd / "a", 8, caption="a")
    write_folder(cwd / "b", 4, caption="b")
    return _toml(cwd, """
        [general]
        resolution = 64
        batch_size = 2
        validation_seed = 7
        [[datasets]]
        validation_split = 0.25
          [[datasets.subsets]]
          image_dir = "a"
        [[datasets]]
        network_multiplier = 0.0
          [[datasets.subsets]]
          image_dir = "b"
    """)


def _training(**kw):
    base = dict(validation_split=0.0, validation_seed=None)
    return SimpleNamespace(**{**base, **kw})


def test_dataset_validation_split_and_seed(two_datasets):
    data = prepare_data(dataset_config(dataset_config=two_datasets), RES)
    o1, o2 = (c.options for c in data.datasets)
    assert (o1.validation_split, o1.validation_seed) == (0.25, 7)
    assert (o2.validation_split, o2.validation_seed) == (None, 7)
    group, held = build_group(data, seed=0, hold_out=hold_out_for(_training(), seed=0))
    assert len(held) == 2 and all(it.image.parent.name == "a" for it in held)
    assert len(group.datasets[0].items) == 6 and len(group.datasets[1].items) == 4
    # validation_seed, not the run's seed, draws the split
    _, same = build_group(data, seed=123, hold_out=hold_out_for(_training(), seed=123))
    assert [it.image for it in same] == [it.image for it in held]
    draws = {tuple(it.image.name for it in build_group(
        data, seed=0, hold_out=hold_out_for(_training(), seed=0))[1])}
    for vs in range(8):
        d2 = replace(data.datasets[0].options, validation_seed=vs)
        one = replace(data, datasets=[replace(data.datasets[0], options=d2)])
        draws.add(tuple(it.image.name for it in build_group(
            one, seed=0, hold_out=hold_out_for(_training(), seed=0))[1]))
    assert len(draws) > 1
    # the second dataset has no validation_split of its own: the [training] one applies
    _, held = build_group(data, seed=0, hold_out=hold_out_for(
        _training(validation_split=0.5), seed=0))
    assert sum(it.image.parent.name == "b" for it in held) == 2


def test_bad_validation_split_in_dataset_toml(cwd):
    write_folder(cwd / "a", 2, caption="a")
    path = _toml(cwd, """
        [[datasets]]
        resolution = 64
        validation_split = 1.5
          [[datasets.subsets]]
          image_dir = "a"
    """)
    with pytest.raises(ConfigError) as info:
        prepare_data(dataset_config(dataset_config=path), RES)
    assert info.value.problems == [f"{path}: [[datasets]] #1: validation_split = 1.5: a "
                                   "fraction in [0, 1)"]


def test_network_multiplier_rides_on_each_batch(two_datasets):
    group, _ = build_group(prepare_data(dataset_config(dataset_config=two_datasets), RES),
                           seed=0)
    seen = set()
    for b in group.batches(0):
        batch = group.collate(b, 0, 0)
        from_b = group.locate(b[0])[0] == 1
        seen.add((from_b, batch.get("network_multiplier", 1.0)))
    assert seen == {(False, 1.0), (True, 0.0)}


def test_weighted_captions_warn_about_commas_in_brackets(cwd):
    write_image(cwd / "img" / "1_x" / "a.png", caption="(red, hair:1.2), smile")
    write_image(cwd / "img" / "1_x" / "b.png", caption="(red hair:1.2), smile")
    d = dataset_config(train_data_dir=cwd / "img", weighted_captions=True, shuffle_caption=True)
    warnings = [w for w in prepare_data(d, RES).warnings if "weighted_captions" in w]
    assert len(warnings) == 1 and "1 caption(s)" in warnings[0] and "a.png" in warnings[0]
    assert not [w for w in prepare_data(replace(d, shuffle_caption=False), RES).warnings
                if "weighted_captions" in w]


def test_in_json_is_ignored_with_a_dataset_toml(masked):
    path = _toml(masked, """
        [[datasets]]
        resolution = 64
          [[datasets.subsets]]
          image_dir = "train/2_sks"
    """)
    data = prepare_data(dataset_config(dataset_config=path, in_json="meta.json"), RES)
    assert data.problems == []
    assert f"{path}: dataset_config is given, so in_json is ignored (as in kohya); use a " \
        "subset's metadata_file" in data.warnings
