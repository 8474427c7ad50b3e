"""The training loop: exact resume, saving cadence and pruning, validation, NaN handling,
gradient accumulation and TensorBoard scalars, through the real CLI on the tiny model."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_network
from tests.test_train_e2e import read_scalars
from tools.make_demo_dataset import make_dataset


@pytest.fixture
def data(tmp_path) -> Path:
    d = tmp_path / "data"
    make_dataset(d, count=4, size=64, seed=3, repeats=2)
    return d


def run(root: Path, model: Path, data: Path, *extra: str) -> int:
    return train_network.main([
        "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
        "--resolution", "64", "--train_batch_size", "2", "--network_dim", "4",
        "--learning_rate", "1e-3", "--seed", "7", "--save_precision", "float",
        "--output_dir", str(root / "out"), "--output_name", "t",
        "--logging_dir", str(root / "logs"), *extra])


def test_resume_reaches_the_same_losses_and_weights(tmp_path, tiny_sd15_dir, data):
    # 4 images x 2 repeats / batch 2 = 4 batches per epoch; 6 steps cross an epoch boundary.
    assert run(tmp_path / "a", tiny_sd15_dir, data, "--max_train_steps", "6",
               "--save_every_n_steps", "3", "--save_state") == 0
    state = tmp_path / "a" / "out" / "t-step00000003-state"
    assert (state / "state.json").is_file() and (tmp_path / "a" / "out" / "t-state").is_dir()
    assert run(tmp_path / "b", tiny_sd15_dir, data, "--max_train_steps", "6",
               "--resume", str(state)) == 0
    a = read_scalars(tmp_path / "a" / "logs")["loss/current"]
    b = read_scalars(tmp_path / "b" / "logs")["loss/current"]
    assert len(a) == 6 and len(b) == 3
    assert b == pytest.approx(a[3:], abs=1e-6)
    wa = load_file(str(tmp_path / "a" / "out" / "t.safetensors"))
    wb = load_file(str(tmp_path / "b" / "out" / "t.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)


def test_resume_from_a_wrong_folder_is_a_clear_error(tmp_path, tiny_sd15_dir, data, capsys):
    bogus = tmp_path / "not-a-state"
    bogus.mkdir()
    assert run(tmp_path, tiny_sd15_dir, data, "--max_train_steps", "2",
               "--resume", str(bogus)) == 2
    assert "no state.json" in capsys.readouterr().err


def test_save_cadence_and_pruning(tmp_path, tiny_sd15_dir, data):
    assert run(tmp_path, tiny_sd15_dir, data, "--max_train_epochs", "3",
               "--save_every_n_steps", "2", "--save_last_n_steps", "4",
               "--save_every_n_epochs", "1", "--save_last_n_epochs", "1") == 0
    names = sorted(p.name for p in (tmp_path / "out").iterdir()
                   if p.suffix == ".safetensors")
    # 12 steps: step saves at 2..10, the last 4 steps' (8, 10) kept; epoch saves at 1, 2
    # (epoch 3 is the final file), only the last one kept.
    assert names == ["t-000002.safetensors", "t-step00000008.safetensors",
                     "t-step00000010.safetensors", "t.safetensors"]


def test_validation_loss_is_logged_and_deterministic(tmp_path, tiny_sd15_dir, data):
    for name in ("a", "b"):
        assert run(tmp_path / name, tiny_sd15_dir, data, "--max_train_steps", "4",
                   "--validation_split", "0.25", "--validate_every_n_steps", "2") == 0
    va = read_scalars(tmp_path / "a" / "logs")["loss/validation"]
    vb = read_scalars(tmp_path / "b" / "logs")["loss/validation"]
    assert len(va) == 2 and va == vb


def test_validation_does_not_change_training(tmp_path, tiny_sd15_dir, data):
    assert run(tmp_path / "a", tiny_sd15_dir, data, "--max_train_steps", "4",
               "--validation_data_dir", str(data), "--validate_every_n_steps", "1") == 0
    assert run(tmp_path / "b", tiny_sd15_dir, data, "--max_train_steps", "4") == 0
    a = read_scalars(tmp_path / "a" / "logs")
    assert len(a["loss/validation"]) == 4
    assert a["loss/current"] == read_scalars(tmp_path / "b" / "logs")["loss/current"]


def test_accumulation_steps_and_scalars(tmp_path, tiny_sd15_dir, data):
    # 4 batches per epoch, accumulation 2 -> 2 optimizer steps per epoch.
    assert run(tmp_path, tiny_sd15_dir, data, "--max_train_epochs", "2",
               "--gradient_accumulation_steps", "2") == 0
    s = read_scalars(tmp_path / "logs")
    assert len(s["loss/current"]) == 4
    assert len(s["loss/epoch"]) == 2
    assert {"lr/unet", "lr/textencoder", "grad_norm", "perf/images_per_s"} <= set(s)


def test_nan_loss_stops_with_exit_1_and_keeps_saved_files(tmp_path, tiny_sd15_dir, data,
                                                          caplog):
    # A learning rate of 1e30 blows the LoRA up after the first update.
    rc = run(tmp_path, tiny_sd15_dir, data, "--max_train_steps", "4",
             "--learning_rate", "1e30", "--max_grad_norm", "0", "--save_every_n_steps", "1")
    assert rc == 1
    assert "loss is" in caplog.text and "learning_rate" in caplog.text
    saved = list((tmp_path / "out").glob("t-step*.safetensors"))
    assert saved, "the checkpoint written before the NaN must stay"
    for f in saved:
        load_file(str(f))  # intact


def test_skip_nan_steps_skips_then_gives_up_after_an_epoch_of_nans(tmp_path, tiny_sd15_dir,
                                                                  data, caplog):
    rc = run(tmp_path, tiny_sd15_dir, data, "--max_train_steps", "6",
             "--learning_rate", "1e30", "--max_grad_norm", "0", "--skip_nan_steps")
    assert rc == 1
    assert "non-finite loss, batch skipped" in caplog.text
    assert "every batch of a whole epoch" in caplog.text


def test_wandb_without_the_package_is_a_config_error(tmp_path, tiny_sd15_dir, data, capsys):
    import importlib.util
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here; the missing-package message cannot be shown")
    assert run(tmp_path, tiny_sd15_dir, data, "--max_train_steps", "1",
               "--log_with", "wandb") == 2
    assert "pip install wandb" in capsys.readouterr().err


def test_gradient_checkpointing_gives_the_same_loss_curve(tmp_path, tiny_sd15_dir, data,
                                                          monkeypatch):
    import torch.utils.checkpoint as ckpt
    calls = []
    real = ckpt.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    assert run(tmp_path / "a", tiny_sd15_dir, data, "--max_train_steps", "4") == 0
    assert not calls
    monkeypatch.setattr(ckpt, "checkpoint", counting)
    assert run(tmp_path / "b", tiny_sd15_dir, data, "--max_train_steps", "4",
               "--gradient_checkpointing") == 0
    assert calls, "gradient_checkpointing must recompute through torch.utils.checkpoint"
    a = read_scalars(tmp_path / "a" / "logs")["loss/current"]
    b = read_scalars(tmp_path / "b" / "logs")["loss/current"]
    assert len(a) == 4 and b == pytest.approx(a, rel=1e-5)
    assert a[1:] != a[:-1]  # the LoRA trained: the curve is not one repeated value


def lora_up_norm(path: Path) -> float:
    w = load_file(str(path))
    return sum(float(v.float().norm()) ** 2 for k, v in w.items()
               if k.endswith("lora_up.weight")) ** 0.5


def test_max_grad_norm_clips_the_lora_update(tmp_path, tiny_sd15_dir, data):
    # lora_up starts at zero, so its norm after training measures how far the LoRA moved.
    assert run(tmp_path / "free", tiny_sd15_dir, data, "--max_train_steps", "3",
               "--optimizer_type", "SGDNesterov", "--max_grad_norm", "0") == 0
    assert run(tmp_path / "clip", tiny_sd15_dir, data, "--max_train_steps", "3",
               "--optimizer_type", "SGDNesterov", "--max_grad_norm", "1e-6") == 0
    free = lora_up_norm(tmp_path / "free" / "out" / "t.safetensors")
    clipped = lora_up_norm(tmp_path / "clip" / "out" / "t.safetensors")
    assert free > 0 and clipped < free * 1e-2, (free, clipped)
    s = read_scalars(tmp_path / "clip" / "logs")
    assert len(s["grad_norm"]) == 3 and all(g > 1e-6 for g in s["grad_norm"])
    assert "grad_norm" not in read_scalars(tmp_path / "free" / "logs")  # not clipped: no norm


def test_resume_with_a_changed_config_warns(tmp_path, tiny_sd15_dir, data, caplog):
    assert run(tmp_path / "a", tiny_sd15_dir, data, "--max_train_steps", "4",
               "--save_every_n_steps", "2", "--save_state") == 0
    state = tmp_path / "a" / "out" / "t-step00000002-state"
    caplog.clear()
    # only where and how often files go changed: the same trajectory, no warning
    assert run(tmp_path / "b", tiny_sd15_dir, data, "--max_train_steps", "4",
               "--save_every_n_steps", "1", "--resume", str(state)) == 0
    assert "config changed" not in caplog.text
    caplog.clear()
    assert run(tmp_path / "c", tiny_sd15_dir, data, "--max_train_steps", "5",
               "--learning_rate", "2e-3", "--resume", str(state)) == 0
    warned = [r.getMessage() for r in caplog.records
              if r.levelname == "WARNING" and "config changed" in r.getMessage()]
    assert len(warned) == 1, caplog.text
    assert "training.max_train_steps: 4 -> 5" in warned[0]
    assert "optimizer.learning_rate: 0.001 -> 0.002" in warned[0]
    assert "not an exact continuation" in warned[0]


def test_earlier_intermediate_saves_block_a_new_run_but_not_a_resume(tmp_path, tiny_sd15_dir,
                                                                     data, capsys):
    out = tmp_path / "out"
    # an earlier run that stopped before its final file: intermediate saves and states only
    assert run(tmp_path, tiny_sd15_dir, data, "--max_train_steps", "4",
               "--save_every_n_steps", "2", "--save_state") == 0
    (out / "t.safetensors").unlink()
    shutil.rmtree(out / "t-state")
    before = (out / "t-step00000002.safetensors").read_bytes()
    capsys.readouterr()
    assert run(tmp_path, tiny_sd15_dir, data, "--max_train_steps", "4",
               "--save_every_n_steps", "2") == 2
    err = capsys.readouterr().err
    assert "Output error" in err and "t-step00000002.safetensors" in err
    assert "set overwrite = true, resume from its -state folder" in err
    assert (out / "t-step00000002.safetensors").read_bytes() == before
    assert not (out / "t.safetensors").exists()
    # resuming the same output continues it (its final file does not exist yet)
    assert run(tmp_path, tiny_sd15_dir, data, "--max_train_steps", "4",
               "--save_every_n_steps", "2", "--resume",
               str(out / "t-step00000002-state")) == 0
    assert (out / "t.safetensors").is_file()
    # and overwrite = true allows a fresh run over all of it
    assert run(tmp_path, tiny_sd15_dir, data, "--max_train_steps", "4",
               "--save_every_n_steps", "2", "--overwrite") == 0


def test_an_existing_final_file_blocks_a_new_run(tmp_path, tiny_sd15_dir, data, capsys):
    assert run(tmp_path, tiny_sd15_dir, data, "--max_train_steps", "1") == 0
    capsys.readouterr()
    assert run(tmp_path, tiny_sd15_dir, data, "--max_train_steps", "1") == 2
    assert "t.safetensors exists; set overwrite = true" in capsys.readouterr().err
