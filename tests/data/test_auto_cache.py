"""Unset `cache_latents` / `cache_text_encoder_outputs` cache when it trains the same thing
(library/data/auto_cache.py); set, they do what they say. The whole run's log and its latent
cache are checked through the real CLI."""
from __future__ import annotations

import logging

import pytest

import train_network
from library.data.auto_cache import (AUTO_TEXT_CACHE_MAX, cache_latents_for_run,
                                     cache_text_for_run)
from library.data.options import SubsetOptions
from library.data.sources import Item
from tests.data.conftest import dataset_config, write_folder, write_image


def items(tmp_path, n=3, **opts):
    img = write_image(tmp_path / "a.png")
    return [Item(img, f"caption {i}", 1, False, "f", True, SubsetOptions(**opts))
            for i in range(n)]


def test_latents_are_cached_unless_random_crop(tmp_path):
    on, note = cache_latents_for_run(dataset_config(), items(tmp_path, flip_aug=True))
    assert on and "cache_latents unset: on" in note
    mixed = items(tmp_path) + items(tmp_path, 1, random_crop=True)
    on, note = cache_latents_for_run(dataset_config(), mixed)
    assert not on and "random_crop" in note
    # set: what it says, without a note
    assert cache_latents_for_run(dataset_config(cache_latents=True), mixed) == (True, None)
    assert cache_latents_for_run(dataset_config(cache_latents=False), items(tmp_path)) == \
        (False, None)
    assert cache_latents_for_run(dataset_config(cache_latents=False,
                                                cache_latents_to_disk=True), mixed) == \
        (True, None)


def test_text_outputs_are_cached_for_frozen_encoders_and_static_captions(tmp_path):
    d = dataset_config()
    on, note = cache_text_for_run(d, False, items(tmp_path))
    assert on and "cache_text_encoder_outputs unset: on" in note
    assert cache_text_for_run(d, True, items(tmp_path)) == (False, None)  # TE trains
    for opts in ({"shuffle_caption": True}, {"caption_tag_dropout_rate": 0.1},
                 {"token_warmup_step": 10}):
        on, note = cache_text_for_run(d, False, items(tmp_path, **opts))
        assert not on and "change from step to step" in note, opts
    on, note = cache_text_for_run(dataset_config(caption_dropout_rate=0.1), False,
                                  items(tmp_path))
    assert not on
    on, note = cache_text_for_run(d, False, items(tmp_path, AUTO_TEXT_CACHE_MAX + 1))
    assert not on and "distinct captions" in note
    assert cache_text_for_run(dataset_config(cache_text_encoder_outputs=False), False,
                              items(tmp_path)) == (False, None)


@pytest.mark.parametrize("flags, cached", [([], True), (["--cache_latents", "false"], False),
                                           (["--random_crop"], False)],
                         ids=["unset", "false", "random_crop"])
def test_a_run_caches_latents_by_default(tmp_path, tiny_sd15_dir, caplog, flags, cached):
    write_folder(tmp_path / "train" / "2_subj person", 2, size=(64, 64), caption="subj")
    with caplog.at_level(logging.INFO, logger="tomlora"):
        rc = train_network.main([
            "--pretrained_model_name_or_path", str(tiny_sd15_dir), "--train_data_dir",
            str(tmp_path / "train"), "--resolution", "64", "--output_dir", str(tmp_path / "o"),
            "--logging_dir", str(tmp_path / "logs"), "--max_train_steps", "1", *flags])
    assert rc == 0
    assert ("latent cache:" in caplog.text) == cached
    assert ("cache_latents unset: on" in caplog.text) == (not flags)
    if "--random_crop" in flags:
        assert "cache_latents unset: off, because random_crop" in caplog.text
