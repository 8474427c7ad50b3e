"""kohya's saving / resume keys: save_state_on_train_end, save_last_n_steps_state,
save_last_n_epochs_state, save_n_epoch_ratio, initial_epoch, initial_step,
skip_until_initial_step. Which folders exist after a run, and which step training starts at:
the pruning rules on the real Checkpointer (its save callbacks write real files), the start
positions as a table, and one tiny run through the CLI that uses four of the keys at once."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

import train_network
from library.config.schema import SavingConfig, TrainingConfig
from library.train.checkpoints import Checkpointer
from library.train.state import Position, read_position, start_position
from tests.test_train_e2e import read_scalars
from tools.make_demo_dataset import make_dataset


def saves_after(tmp_path: Path, steps: int, steps_per_epoch: int, **saving) -> list[str]:
    """Names in output_dir after a run of `steps` steps with these [saving] keys."""
    s = SavingConfig(output_name="t", **saving)

    def lora(path, step, epoch):
        path.write_text(str(step))

    def state(folder, pos):
        folder.mkdir(exist_ok=True)

    ck = Checkpointer(s, tmp_path, tmp_path / "t.safetensors", lora, state, True,
                      epochs=-(-steps // steps_per_epoch))
    for step in range(1, steps + 1):
        pos = Position(step, 0, 0, 0)
        ck.after_step(step, 0, steps, pos)
        if step % steps_per_epoch == 0:
            ck.after_epoch(step // steps_per_epoch, step, steps, pos)
    ck.final(steps, 0, Position(steps, 0, 0, 0))
    return sorted(p.name for p in tmp_path.iterdir())


def test_save_state_on_train_end_writes_only_the_final_state(tmp_path):
    assert saves_after(tmp_path, 3, 10, save_every_n_steps=1, save_state_on_train_end=True) \
        == ["t-state", "t-step00000001.safetensors", "t-step00000002.safetensors",
            "t.safetensors"]


def test_save_last_n_steps_state_prunes_states_not_loras(tmp_path):
    assert saves_after(tmp_path, 5, 10, save_every_n_steps=1, save_state=True,
                       save_last_n_steps_state=1) == [
        "t-state", "t-step00000001.safetensors", "t-step00000002.safetensors",
        "t-step00000003.safetensors", "t-step00000004-state", "t-step00000004.safetensors",
        "t.safetensors"]


def test_save_last_n_steps_state_defaults_to_save_last_n_steps(tmp_path):
    assert saves_after(tmp_path, 4, 10, save_every_n_steps=1, save_state=True,
                       save_last_n_steps=2, save_last_n_steps_state=1) == [
        "t-state", "t-step00000002.safetensors", "t-step00000003-state",
        "t-step00000003.safetensors", "t.safetensors"]
    (tmp_path / "b").mkdir()
    assert saves_after(tmp_path / "b", 4, 10, save_every_n_steps=1, save_state=True,
                       save_last_n_steps=1) == [
        "t-state", "t-step00000003-state", "t-step00000003.safetensors", "t.safetensors"]


def test_save_last_n_epochs_state_keeps_the_last_epoch_states(tmp_path):
    assert saves_after(tmp_path, 4, 1, save_every_n_epochs=1, save_state=True,
                       save_last_n_epochs_state=1) == [
        "t-000001.safetensors", "t-000002.safetensors", "t-000003-state",
        "t-000003.safetensors", "t-state", "t.safetensors"]


@pytest.mark.parametrize("ratio, epochs, saved", [
    (2, 4, ["t-000002.safetensors"]),                        # every 4 // 2 = 2 epochs
    (4, 4, ["t-000001.safetensors", "t-000002.safetensors", "t-000003.safetensors"]),
    (10, 4, ["t-000001.safetensors", "t-000002.safetensors", "t-000003.safetensors"]),
    (1, 4, [])])                                             # every 4 epochs: the final only
def test_save_n_epoch_ratio_sets_the_epoch_interval(ratio, epochs, saved, tmp_path):
    names = saves_after(tmp_path, epochs, 1, save_every_n_epochs=3, save_n_epoch_ratio=ratio)
    assert names == saved + ["t.safetensors"]


@pytest.mark.parametrize("keys, expected", [
    ({}, None),
    ({"initial_step": 0}, Position(0, 0, 0, 7)),
    ({"initial_step": 5}, Position(5, 1, 0, 7)),             # epoch 2 starts at its beginning
    ({"initial_step": 5, "skip_until_initial_step": True}, Position(5, 1, 2, 7)),
    ({"initial_epoch": 2}, Position(4, 1, 0, 7)),
    ({"initial_epoch": 3, "initial_step": 1}, Position(1, 0, 0, 7)),  # step wins
])
def test_initial_step_and_epoch_start_positions(keys, expected):
    # 4 optimizer steps per epoch, gradient accumulation 2 (8 batches per epoch)
    assert start_position(TrainingConfig(**keys), 7, 4, 2, 12) == expected


def test_an_initial_step_past_the_end_is_an_error():
    with pytest.raises(ValueError, match="initial_epoch: starts at step 12, but the run has 12"):
        start_position(TrainingConfig(initial_epoch=4), 7, 4, 1, 12)


def test_a_tiny_run_with_initial_step_and_the_saving_keys(tmp_path, tiny_sd15_dir):
    make_dataset(tmp_path / "data", count=2, size=32, seed=3, repeats=1)
    out = tmp_path / "out"
    # 2 images, batch 1: 2 steps per epoch, 2 epochs = 4 steps; start after step 1
    assert train_network.main([
        "--pretrained_model_name_or_path", str(tiny_sd15_dir),
        "--train_data_dir", str(tmp_path / "data"), "--resolution", "32",
        "--train_batch_size", "1", "--network_dim", "2", "--network_train_unet_only",
        "--cache_text_encoder_outputs", "--seed", "7", "--max_train_epochs", "2",
        "--output_dir", str(out), "--output_name", "t", "--logging_dir", str(tmp_path / "logs"),
        "--initial_step", "1", "--skip_until_initial_step", "--save_every_n_steps", "1",
        "--save_state_on_train_end", "--save_n_epoch_ratio", "2"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.name != "t.toml") == [
        "t-000001.safetensors", "t-state", "t-step00000002.safetensors",
        "t-step00000003.safetensors", "t.safetensors"]
    assert read_position(out / "t-state")[0] == Position(4, 2, 0, 7)
    scalars = read_scalars(tmp_path / "logs")
    assert len(scalars["loss/current"]) == 3  # steps 2, 3 and 4 trained
    with safe_open(str(out / "t-step00000002.safetensors"), "pt") as fh:
        assert fh.metadata()["ss_steps"] == "2"
    assert json.loads((out / "t-state" / "state.json").read_text())["step"] == 4


def test_the_keys_are_in_the_schema_sections():
    assert {"save_state_on_train_end", "save_last_n_steps_state", "save_last_n_epochs_state",
            "save_n_epoch_ratio"} <= set(SavingConfig.__dataclass_fields__)
    assert {"initial_epoch", "initial_step", "skip_until_initial_step"} <= set(
        TrainingConfig.__dataclass_fields__)
