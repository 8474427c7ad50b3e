"""Per-subset options reach the samples; alpha masks; the epoch plan (library/data/dataset.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from library.data.dataset import DataGroup, DataSet, epoch_batches, latent_mask
from library.data import buckets as B
from library.data.options import DataOptions, SubsetOptions
from library.data.sources import Item
from tests.data.conftest import write_image


def _set(items, **kw) -> DataSet:
    return DataSet(items, DataOptions((64, 64), kw.pop("batch_size", 1), **kw), seed=3)


def test_each_item_uses_its_subsets_caption_options(tmp_path):
    img = write_image(tmp_path / "a.png")
    plain = Item(img, "a, b, c, d", 1, False, "f", True, SubsetOptions())
    styled = Item(img, "a, b, c, d", 1, False, "f", True, SubsetOptions(
        caption_prefix="photo of", caption_suffix="best", shuffle_caption=True, keep_tokens=1))
    dropped = Item(img, "a, b", 1, False, "f", True,
                   SubsetOptions(caption_dropout_every_n_epochs=2))
    ds = _set([plain, styled, dropped])
    assert ds.caption(0, 0, 0) == "a, b, c, d"
    shuffled = {ds.caption(1, 0, slot) for slot in range(30)}
    assert all(c.startswith("photo of a, ") and c.endswith(" best") for c in shuffled)
    assert len(shuffled) > 1  # the tags after keep_tokens move
    assert ds.caption(2, 0, 0) == "a, b" and ds.caption(2, 1, 0) == ""  # epoch 2 of 2 drops


def test_token_warmup_grows_with_the_step(tmp_path):
    img = write_image(tmp_path / "a.png")
    item = Item(img, "t0, t1, t2, t3, t4", 1, False, "f", True,
                SubsetOptions(token_warmup_min=1, token_warmup_step=0.5))
    ds = _set([item])
    counts = [len(ds.caption(0, 0, 0, step=s, total_steps=8).split(", ")) for s in range(6)]
    assert counts == [1, 2, 3, 4, 5, 5]  # warmup over 4 of 8 steps


def test_wildcard_picks_one_line(tmp_path):
    img = write_image(tmp_path / "a.png")
    item = Item(img, "red {cat|dog}\nblue bird", 1, False, "f", True,
                SubsetOptions(enable_wildcard=True))
    ds = _set([item])
    seen = {ds.caption(0, 0, s) for s in range(40)}
    assert seen == {"red cat", "red dog", "blue bird"}


def test_flip_and_random_crop_follow_the_subset(tmp_path):
    img = tmp_path / "half.png"
    array = np.zeros((64, 128, 3), np.uint8)
    array[:, :64] = 255  # left half white: a flip moves it right
    Image.fromarray(array).save(img)
    fixed = Item(img, "", 1, False, "f", True, SubsetOptions())
    flipping = Item(img, "", 1, False, "f", True, SubsetOptions(flip_aug=True,
                                                                random_crop=True))
    ds = _set([fixed, flipping])
    centre = {tuple(ds.sample(0, 0, s)["crop_top_left"].tolist()) for s in range(20)}
    assert centre == {(0, 32)}  # 128x64 cover-scaled to 128x64, centre crop of 64
    crops = {tuple(ds.sample(1, 0, s)["crop_top_left"].tolist()) for s in range(40)}
    assert len(crops) > 5
    left_bright = {bool(ds.sample(1, 0, s)["pixels"][0, 0, 0] > 0) for s in range(40)}
    assert left_bright == {True, False}


def test_alpha_mask_at_latent_resolution(tmp_path):
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., :3] = 90
    rgba[:, 32:, 3] = 255  # right half opaque
    path = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(path)
    masked = Item(path, "", 1, False, "f", True, SubsetOptions(alpha_mask=True,
                                                               flip_aug=True))
    unmasked = Item(write_image(tmp_path / "b.png"), "", 1, False, "f", True, SubsetOptions())
    ds = _set([masked, unmasked])
    masks = {}
    for s in range(20):
        out = ds.sample(0, 0, s)
        flipped = bool(out["pixels"][0, 0, 0] < 1.0)  # transparent -> white on the left
        masks[flipped] = out["alpha_mask"]
    assert masks[False].shape == (1, 8, 8)
    assert masks[False][0, :, :4].sum() == 0 and (masks[False][0, :, 4:] == 1).all()
    assert torch.equal(masks[True], masks[False].flip(-1))
    assert (ds.sample(1, 0, 0)["alpha_mask"] == 1).all()  # no alpha_mask: all ones
    assert "alpha_mask" not in _set([unmasked]).sample(0, 0, 0)


def test_latent_mask_area_averages():
    alpha = np.zeros((16, 16), np.float32)
    alpha[:, :4] = 1.0
    box = B.crop_box((16, 16), (16, 16))
    mask = latent_mask(alpha, box, (16, 16), False)
    assert mask.shape == (1, 2, 2) and mask[0, 0, 0].item() == pytest.approx(0.5)


def test_epoch_plan_is_deterministic_and_exact():
    buckets = [(64, 64)] * 3 + [(64, 128)] * 2
    repeats = [3, 1, 2, 5, 1]
    a = epoch_batches(buckets, repeats, 2, seed=1, epoch=0)
    assert a == epoch_batches(buckets, repeats, 2, seed=1, epoch=0)
    assert a != epoch_batches(buckets, repeats, 2, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == [0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 3, 4]
    assert all(len({buckets[i] for i in b}) == 1 for b in a)
    assert len(a) == 3 + 3  # ceil(6 / 2) per bucket


def test_one_dataset_group_keeps_the_plain_plan(tmp_path):
    items = [Item(write_image(tmp_path / f"{k}.png"), "", 2, False, "f", True)
             for k in range(3)]
    ds = _set(items, batch_size=2)
    group = DataGroup([ds], seed=3)
    assert group.batches(4) == ds.batches(4) and len(group) == 6


def test_center_crop_false_means_random_crop():
    from tests.data.conftest import dataset_config
    assert not SubsetOptions.from_config(dataset_config()).random_crop
    assert SubsetOptions.from_config(dataset_config(center_crop=False)).random_crop
    assert SubsetOptions.from_config(dataset_config(random_crop=True)).random_crop


def test_reg_samples_carry_prior_loss_weight(tmp_path):
    from library.data.prepare import build_group, prepare_data
    from tests.data.conftest import dataset_config, write_folder
    write_folder(tmp_path / "train" / "2_subj person", 2, caption="subj")
    write_folder(tmp_path / "reg" / "1_person", 4, caption="a person")
    data = prepare_data(dataset_config(train_data_dir=tmp_path / "train",
                                       reg_data_dir=tmp_path / "reg", prior_loss_weight=0.25,
                                       train_batch_size=8), (64, 64))
    assert data.problems == []
    group, _ = build_group(data, 0)
    (batch,) = group.batches(0)  # 4 train + 4 reg samples, one bucket: one batch of 8
    out = group.collate(batch, 0, 0)
    is_reg = [group.items[i].is_reg for i in batch]
    assert sorted(is_reg) == [False] * 4 + [True] * 4
    assert out["loss_weight"].tolist() == [0.25 if r else 1.0 for r in is_reg]
    assert [c == "a person" for c in out["captions"]] == is_reg
