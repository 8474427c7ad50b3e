"""kohya dataset TOML (library/data/dataset_config.py): keys, levels, precedence, errors."""
from __future__ import annotations

import json
import textwrap

import pytest

from library.config import ConfigError
from library.data.dataset_config import read_dataset_config
from library.data.prepare import build_group, prepare_data
from tests.data.conftest import dataset_config, write_folder


def _toml(tmp_path, text: str):
    path = tmp_path / "data.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def _problems(path, d=None, **kw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        read_dataset_config(path, d or dataset_config(), **kw)
    return info.value.problems


@pytest.fixture
def folders(cwd):
    write_folder(cwd / "img" / "alice", 3, caption="alice, red hat, smiling")
    write_folder(cwd / "img" / "woman", 4, caption=None)
    write_folder(cwd / "img" / "wide", 2, size=(128, 64), caption="wide")
    return cwd


def test_levels_and_precedence(folders):
    path = _toml(folders, """
        [general]
        shuffle_caption = true
        keep_tokens = 1
        caption_extension = ".txt"
        enable_bucket = true

        [[datasets]]
        resolution = 64
        batch_size = 2
        keep_tokens = 2

          [[datasets.subsets]]
          image_dir = "img/alice"
          num_repeats = 5
          caption_prefix = "photo of"

          [[datasets.subsets]]
          image_dir = "img/woman"
          is_reg = true
          class_tokens = "woman"
          keep_tokens = 0
          flip_aug = true

        [[datasets]]
        resolution = [128, 64]
        min_bucket_reso = 64

          [[datasets.subsets]]
          image_dir = "img/wide"
    """)
    d = dataset_config(train_batch_size=3, flip_aug=False, caption_dropout_rate=0.1)
    specs, warnings = read_dataset_config(path, d, (), (512, 512))
    assert warnings == []
    first, second = specs
    assert first.options.resolution == (64, 64) and first.options.batch_size == 2
    assert first.options.enable_bucket  # from [general]
    alice, woman = first.subsets
    assert (alice.num_repeats, alice.is_reg, alice.caption_extension) == (5, False, ".txt")
    assert alice.opts.shuffle_caption and alice.opts.keep_tokens == 2  # dataset beats general
    assert alice.opts.caption_prefix == "photo of" and not alice.opts.flip_aug
    assert alice.opts.caption_dropout_rate == 0.1  # from the main config
    assert (woman.is_reg, woman.class_tokens, woman.num_repeats) == (True, "woman", 1)
    assert woman.opts.keep_tokens == 0 and woman.opts.flip_aug  # subset beats dataset
    assert second.options.resolution == (128, 64) and second.options.batch_size == 3
    assert second.label == "data.toml [[datasets]] #2"

    # A flag typed on the command line beats every level of the dataset file.
    cli = dataset_config(train_batch_size=4, keep_tokens=3)
    specs, _ = read_dataset_config(path, cli, {"train_batch_size", "keep_tokens"}, (512, 512))
    assert [s.options.batch_size for s in specs] == [4, 4]
    assert {sub.opts.keep_tokens for s in specs for sub in s.subsets} == {3}


def test_unknown_keys_name_file_entry_and_key(folders):
    path = _toml(folders, """
        [general]
        shuffle_captions = true
        image_dir = "img/alice"
        prior_loss_weight = 0.5

        [[datasets]]
        batchsize = 2
          [[datasets.subsets]]
          image_dir = "img/alice"
          num_repeat = 3
    """)
    assert _problems(path) == [
        f"{path}: [general] shuffle_captions: unknown key (did you mean shuffle_caption?)",
        f"{path}: [general] image_dir: belongs in a [[datasets.subsets]] entry",
        f"{path}: [general] prior_loss_weight: a main-config key, not a dataset_config key; "
        "set it in the --config_file [dataset] section or on the command line",
        f"{path}: [[datasets]] #1 batchsize: unknown key (did you mean batch_size?)",
        f"{path}: [[datasets]] #1 [[datasets.subsets]] #1 num_repeat: unknown key (did you "
        "mean num_repeats?)",
    ]


def test_values_types_and_unsupported_keys(folders):
    path = _toml(folders, """
        [[datasets]]
        resolution = 100
        enable_bucket = true
          [[datasets.subsets]]
          image_dir = "img/nothere"
          num_repeats = "ten"
          color_aug = true
          caption_dropout_rate = 1.5
          [[datasets.subsets]]
          class_tokens = "x"
    """)
    where = f"{path}: [[datasets]] #1 [[datasets.subsets]]"
    assert _problems(path) == [
        f"{where} #1 num_repeats: expected an integer, got 'ten'",
        f"{where} #1 color_aug: colour augmentation is not supported (it also breaks latent "
        "caching in kohya); remove it",
        f"{where} #1 image_dir: folder 'img/nothere' not found (looked in the working "
        "directory and beside data.toml)",
        f"{where} #2: needs image_dir (a folder of images) or metadata_file (kohya fine-tuning "
        "JSON)",
        f"{path}: [[datasets]] #1: resolution 100x100: 100 is not a positive multiple of 64",
    ]


def test_file_level_problems(tmp_path):
    assert _problems(tmp_path / "none.toml") == [
        f"dataset_config: file {str(tmp_path / 'none.toml')!r} not found"]
    bad = _toml(tmp_path, "[[datasets]\n")
    assert _problems(bad)[0].startswith(f"{bad}: invalid TOML: ")
    empty = _toml(tmp_path, "[general]\nflip_aug = true\n[dataset]\nx = 1\n")
    assert _problems(empty) == [
        f"{empty}: dataset: unknown top-level key or section (did you mean datasets?); a "
        "dataset config has [general] and [[datasets]] only",
        f"{empty}: no [[datasets]] entries; add at least one [[datasets]] with a "
        "[[datasets.subsets]] image_dir"]


def test_paths_beside_the_toml_and_ignored_train_data_dir(tmp_path, cwd):
    sub = tmp_path / "project"
    write_folder(sub / "imgs", 1)
    path = sub / "data.toml"
    path.write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "imgs"\n')
    specs, warnings = read_dataset_config(path, dataset_config(train_data_dir="x"))
    assert specs[0].subsets[0].image_dir == sub / "imgs"
    assert warnings == [f"{path}: dataset_config is given, so train_data_dir / reg_data_dir "
                        "are ignored (as in kohya)"]


def test_two_datasets_plan_and_batches_never_mix(folders):
    path = _toml(folders, """
        [general]
        enable_bucket = true
        [[datasets]]
        resolution = 64
        batch_size = 2
          [[datasets.subsets]]
          image_dir = "img/alice"
          num_repeats = 2
          [[datasets.subsets]]
          image_dir = "img/woman"
          is_reg = true
          class_tokens = "woman"
        [[datasets]]
        resolution = [128, 64]
        batch_size = 1
        min_bucket_reso = 64
          [[datasets.subsets]]
          image_dir = "img/wide"
          num_repeats = 3
    """)
    data = prepare_data(dataset_config(dataset_config=path), (512, 512))
    assert data.problems == []
    group, _ = build_group(data, seed=5)
    one, two = group.datasets
    # dataset 1: 3 images x 2 = 6 training samples; 4 reg images balanced to 6 samples
    assert [i.repeats for i in one.items] == [2, 2, 2, 2, 2, 1, 1]
    assert one.steps_per_epoch() == 6 and two.steps_per_epoch() == 6  # 12 / 2, 6 / 1
    assert set(two.buckets) == {(128, 64)}
    assert group.steps_per_epoch() == 12
    for epoch in range(2):
        batches = group.batches(epoch)
        assert len(batches) == 12
        for b in batches:
            assert len({group.locate(i)[0] for i in b}) == 1
        assert sorted(i for b in batches for i in b) == sorted(
            i for i, r in enumerate(group.repeats) for _ in range(r))
    batch = group.collate(next(b for b in group.batches(0) if group.locate(b[0])[0] == 1),
                          0, 0)
    assert tuple(batch["pixels"].shape) == (1, 3, 64, 128)


def test_metadata_file_subset(cwd):
    write_folder(cwd / "ft", 2, caption=None)
    (cwd / "ft.json").write_text(json.dumps({"000": {"caption": "zero"},
                                             "001": {"tags": "one, two"}}))
    path = _toml(cwd, """
        [[datasets]]
        resolution = 64
          [[datasets.subsets]]
          image_dir = "ft"
          metadata_file = "ft.json"
          num_repeats = 4
    """)
    data = prepare_data(dataset_config(dataset_config=path), (512, 512))
    assert data.problems == []
    assert [(i.image.name, i.caption, i.repeats) for i in data.items] == [
        ("000.png", "zero", 4), ("001.png", "one, two", 4)]
