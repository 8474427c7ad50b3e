"""The doctor through the real CLI: golden epoch plans from `--dry_run`, which loads no model
and writes nothing, and exit 2 with every problem listed."""
from __future__ import annotations

import logging
import textwrap

import pytest

import train_network
from tests.data.conftest import write_folder, write_image


def dry_run(model, tmp_path, *args) -> int:
    return train_network.main(["--pretrained_model_name_or_path", str(model), "--output_dir",
                               str(tmp_path / "out"), "--logging_dir", str(tmp_path / "logs"),
                               "--dry_run", *args])


def plan_of(out: str) -> str:
    return out[out.index("Data plan"):].rstrip()


@pytest.fixture
def kohya_layout(tmp_path):
    train, reg = tmp_path / "train", tmp_path / "reg"
    write_folder(train / "5_alice woman", 3, size=(128, 128), caption="alice woman, smiling")
    write_folder(train / "2_bob man", 1, size=(64, 128), caption="bob man")
    write_folder(train / "2_bob man", 1, size=(64, 128), caption="bob", caption_ext=".caption",
                 start=1)
    write_folder(reg / "1_woman", 4, size=(128, 128), caption=None)
    return train, reg


def test_golden_plan_with_buckets_reg_and_accumulation(tmp_path, tiny_sd15_dir, kohya_layout,
                                                       capsys, caplog):
    train, reg = kohya_layout
    rc = dry_run(tiny_sd15_dir, tmp_path, "--train_data_dir", str(train), "--reg_data_dir",
                 str(reg), "--resolution", "128", "--enable_bucket", "--min_bucket_reso", "64",
                 "--max_bucket_reso", "256", "--train_batch_size", "2",
                 "--gradient_accumulation_steps", "4", "--max_train_epochs", "3",
                 "--cache_latents_to_disk")
    assert rc == 0
    # 3 x 5 + 2 x 2 = 19 training samples; 4 reg images balanced to 19 (5, 5, 5, 4);
    # 128x128: 15 + 19 = 34 samples -> 17 batches of 2; 64x192: 4 -> 2; 19 batches;
    # ceil(19 / 4) = 5 optimizer steps per epoch, 3 epochs = 15 steps.
    assert plan_of(capsys.readouterr().out) == textwrap.dedent(f"""\
        Data plan (train_data_dir {train}, reg_data_dir {reg}):
          dataset: resolution 128x128, batch size 2, buckets 64..256 step 64
            train 2_bob man         2 images x   2 repeats = 4 samples, 1 with captions
            train 5_alice woman     3 images x   5 repeats = 15 samples, 3 with captions
            reg   1_woman           4 images x   1 repeats = 4 samples, 0 with captions; balanced to 19 samples
            samples per epoch: 38 (19 regularization, balanced to the 19 training samples, weight 1)
            buckets (samples -> batches): 64x192: 4 -> 2, 128x128: 34 -> 17
            batches per epoch: 19
          optimizer steps per epoch: ceil(19 batches / gradient accumulation 4) = 5
          total: 15 steps = 3 epoch(s)""")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (f"{train / '2_bob man'}: 1 of 2 images have no .txt caption; they train with the "
            "caption 'bob man'. Found .caption files instead: set caption_extension = "
            "\".caption\"") in warnings
    # --dry_run loads no model and writes nothing: no output folder, logs or caches.
    assert not (tmp_path / "out").exists() and not (tmp_path / "logs").exists()
    assert list(tmp_path.rglob("*.npz")) == []


def test_golden_plan_without_buckets_and_max_steps(tmp_path, tiny_sd15_dir, capsys):
    write_folder(tmp_path / "data" / "10_zkz toy", 5, size=(96, 64))
    rc = dry_run(tiny_sd15_dir, tmp_path, "--train_data_dir", str(tmp_path / "data"),
                 "--resolution", "64", "--train_batch_size", "4", "--max_train_steps", "100")
    assert rc == 0
    assert plan_of(capsys.readouterr().out) == textwrap.dedent(f"""\
        Data plan (train_data_dir {tmp_path / 'data'}):
          dataset: resolution 64x64, batch size 4, no buckets (resize to cover, then crop)
            train 10_zkz toy     5 images x  10 repeats = 50 samples, 5 with captions
            samples per epoch: 50
            buckets (samples -> batches): 64x64: 50 -> 13
            batches per epoch: 13
          optimizer steps per epoch: ceil(13 batches / gradient accumulation 1) = 13
          total: 100 steps = 8 epoch(s)""")


def test_golden_plan_of_a_dataset_toml(tmp_path, tiny_sd15_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_folder(tmp_path / "subject", 4, caption="sks dog")
    write_folder(tmp_path / "class", 2, caption=None)
    write_folder(tmp_path / "wide", 3, size=(128, 64), caption="landscape")
    (tmp_path / "data.toml").write_text(textwrap.dedent("""\
        [general]
        caption_extension = ".txt"
        [[datasets]]
        resolution = 64
        batch_size = 2
          [[datasets.subsets]]
          image_dir = "subject"
          num_repeats = 3
          [[datasets.subsets]]
          image_dir = "class"
          class_tokens = "dog"
          is_reg = true
        [[datasets]]
        resolution = [128, 64]
        batch_size = 3
          [[datasets.subsets]]
          image_dir = "wide"
    """))
    rc = dry_run(tiny_sd15_dir, tmp_path, "--dataset_config", "data.toml",
                 "--gradient_accumulation_steps", "2", "--max_train_epochs", "2")
    assert rc == 0
    # dataset 1: 12 training + 12 reg (2 images x 6) = 24 samples / 2 = 12 batches;
    # dataset 2: 3 samples / 3 = 1 batch; ceil(13 / 2) = 7 steps per epoch.
    assert plan_of(capsys.readouterr().out) == textwrap.dedent("""\
        Data plan (dataset_config data.toml):
          dataset 1: resolution 64x64, batch size 2, no buckets (resize to cover, then crop)
            train subject     4 images x   3 repeats = 12 samples, 4 with captions
            reg   class       2 images x   1 repeats = 2 samples, 0 with captions; balanced to 12 samples
            samples per epoch: 24 (12 regularization, balanced to the 12 training samples, weight 1)
            buckets (samples -> batches): 64x64: 24 -> 12
            batches per epoch: 12
          dataset 2: resolution 128x64, batch size 3, no buckets (resize to cover, then crop)
            train wide     3 images x   1 repeats = 3 samples, 3 with captions
            samples per epoch: 3
            buckets (samples -> batches): 128x64: 3 -> 1
            batches per epoch: 1
          optimizer steps per epoch: ceil(13 batches / gradient accumulation 2) = 7
          total: 14 steps = 2 epoch(s)""")


def test_bad_data_exits_2_listing_every_problem(tmp_path, tiny_sd15_dir, capsys):
    folder = tmp_path / "data" / "3_x"
    write_folder(folder, 1)
    (folder / "empty.png").write_bytes(b"")
    write_image(folder / "small.png", size=(20, 20))
    rc = dry_run(tiny_sd15_dir, tmp_path, "--train_data_dir", str(tmp_path / "data"),
                 "--resolution", "64", "--enable_bucket")
    err = capsys.readouterr().err
    assert rc == 2
    assert "Data error (3 problems); nothing was trained or written:" in err
    assert f"{folder / 'empty.png'}: the file is empty (0 bytes)" in err
    assert f"{folder / 'small.png'}: 20x20 is below the smallest bucket" in err
    assert not (tmp_path / "out").exists()


def test_bad_dataset_toml_is_a_configuration_error(tmp_path, tiny_sd15_dir, capsys):
    (tmp_path / "d.toml").write_text("[[datasets]]\n[[datasets.subsets]]\nimage_dri = 'x'\n")
    rc = dry_run(tiny_sd15_dir, tmp_path, "--dataset_config", str(tmp_path / "d.toml"))
    err = capsys.readouterr().err
    assert rc == 2 and "Configuration error" in err
    assert (f"{tmp_path / 'd.toml'}: [[datasets]] #1 [[datasets.subsets]] #1 image_dri: "
            "unknown key (did you mean image_dir?)") in err


def test_seed_002_layout_dry_run_warns_about_the_reg_folder(tmp_path, tiny_sd15_dir, caplog):
    data = tmp_path / "training_data"
    write_folder(data / "10_mysubject_person", 2, caption="mysubject person")
    write_folder(data / "100_person", 2, caption=None)
    assert dry_run(tiny_sd15_dir, tmp_path, "--train_data_dir", str(data), "--resolution",
                   "64") == 0
    assert any("100_person: looks like regularization images for 10_mysubject_person" in
               r.getMessage() for r in caplog.records)
