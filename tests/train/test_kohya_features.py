"""kohya features through the real trainer CLI on the tiny SD1.5 model: scale_weight_norms
(TensorBoard scalars, norms of the saved file), a non-AdamW optimizer (Prodigy), metadata
keys and no_metadata, class-path optimizers and schedulers (sd-scripts' "any optimizer" and
lr_scheduler_type), and their config errors before any model loads."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import train_network
from tests.test_train_e2e import read_scalars
from tests.train.test_loop import data, run  # noqa: F401  (the dataset fixture)
from tools.show_metadata import format_metadata, read_metadata

MAX_NORM = 1e-4  # Prodigy starts at d0 = 1e-6: module norms pass 1e-4 from step 2


def saved_norms(path: Path) -> dict[str, float]:
    """||up @ down|| * alpha / rank of every module of a kohya file, computed here in fp64."""
    with safe_open(str(path), "pt") as f:
        sd = {k: f.get_tensor(k).double() for k in f.keys()}
    norms = {}
    for k in sd:
        if k.endswith(".lora_down.weight"):
            stem = k[:-len(".lora_down.weight")]
            up, down = sd[f"{stem}.lora_up.weight"], sd[k]
            delta = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
            norms[stem] = float(torch.linalg.norm(delta) * sd[f"{stem}.alpha"] / down.shape[0])
    return norms


def test_prodigy_with_max_norm_and_metadata(tmp_path, tiny_sd15_dir, data, caplog):  # noqa: F811
    with caplog.at_level(logging.INFO, logger="tomlora"):
        rc = run(tmp_path, tiny_sd15_dir, data, "--max_train_steps", "3",
                 "--optimizer_type", "prodigy", "--learning_rate", "1.0",
                 "--scale_weight_norms", str(MAX_NORM),
                 "--training_comment", "trained for the test ☃",
                 "--metadata_author", "A. Tester", "--metadata_description", "a tiny LoRA",
                 "--metadata_license", "CC-BY-4.0", "--metadata_tags", "tiny,test")
    assert rc == 0
    assert "optimizer: Prodigy" in caplog.text
    out = tmp_path / "out" / "t.safetensors"

    # the clamp acted (Prodigy's steps grow the updates past the max) and is in TensorBoard
    scalars = read_scalars(tmp_path / "logs")
    assert len(scalars["max_norm/keys_scaled"]) == 3
    keys = scalars["max_norm/keys_scaled"]
    assert keys[0] == 0 and keys[-1] > 0, keys  # below the max at first, then clamped
    assert all(v <= MAX_NORM * (1 + 1e-5) for v in scalars["max_norm/max_key_norm"])
    assert all(0 < v <= MAX_NORM * (1 + 1e-5) for v in scalars["norm/avg_key_norm"][1:])
    assert all(math.isfinite(v) for v in scalars["loss/current"])
    assert "lr/d*lr/unet" in scalars  # Prodigy's step-size estimate
    # the saved LoRA: every module's norm is at most the max, and some sit right at it
    norms = saved_norms(out)
    assert max(norms.values()) <= MAX_NORM * (1 + 1e-5)
    assert max(norms.values()) == pytest.approx(MAX_NORM, rel=1e-4)

    meta, _ = read_metadata(out)
    assert meta["ss_training_comment"] == "trained for the test ☃"
    assert meta["ss_scale_weight_norms"] == str(MAX_NORM)
    assert meta["ss_optimizer"] == "Prodigy"
    assert meta["modelspec.title"] == "t"  # default: output_name
    assert (meta["modelspec.author"], meta["modelspec.description"],
            meta["modelspec.license"], meta["modelspec.tags"]) == \
        ("A. Tester", "a tiny LoRA", "CC-BY-4.0", "tiny,test")
    shown = format_metadata(meta, 0)
    assert "modelspec.author: A. Tester" in shown and "ss_training_comment: trained" in shown


def test_class_paths_step_lr_and_no_metadata(tmp_path, tiny_sd15_dir, data, caplog):  # noqa: F811
    with caplog.at_level(logging.INFO, logger="tomlora"):
        rc = run(tmp_path, tiny_sd15_dir, data, "--max_train_steps", "3",
                 "--optimizer_type", "torch.optim.Adam",
                 "--optimizer_args", "betas=0.8,0.99", "weight_decay=0",
                 "--lr_scheduler_type", "StepLR",
                 "--lr_scheduler_args", "step_size=1", "gamma=0.5",
                 "--metadata_title", "My LoRA", "--no_metadata")
    assert rc == 0
    assert "imported torch.optim.adam.Adam, called with lr=0.001, betas=[0.8, 0.99]" \
        in caplog.text
    assert "imported torch.optim.lr_scheduler.StepLR" in caplog.text
    # StepLR halves the rate every step: the lr after steps 1, 2, 3
    lrs = read_scalars(tmp_path / "logs")["lr/unet"]
    assert lrs == pytest.approx([5e-4, 2.5e-4, 1.25e-4])
    meta, _ = read_metadata(tmp_path / "out" / "t.safetensors")
    ss = sorted(k for k in meta if k.startswith("ss_"))
    assert ss == ["ss_base_model_version", "ss_network_alpha", "ss_network_args",
                  "ss_network_dim", "ss_network_module", "ss_v2"]
    assert "tomlora_config" not in meta
    assert meta["modelspec.title"] == "My LoRA"
    assert meta["modelspec.architecture"] and meta["sshs_model_hash"]


@pytest.mark.parametrize("flags, fragment", [
    (["--optimizer_type", "no_such_pkg_xyz.Fancy"],
     "[optimizer] optimizer_type: 'no_such_pkg_xyz.Fancy': cannot import module "
     "'no_such_pkg_xyz'"),
    (["--optimizer_type", "torch.optim.NoSuchAdam"],
     "optimizer_type: 'torch.optim.NoSuchAdam': module 'torch.optim' has no class "
     "'NoSuchAdam'"),
    (["--optimizer_type", "Lion4bit"], "'Lion4bit' is unknown; expected one of: AdamW, "),
    (["--optimizer_type", "torch.optim.RAdam", "--optimizer_args", "betaz=0.9,0.99"],
     "optimizer_args: 'betaz' is not an argument of torch.optim.radam.RAdam; accepted: "),
    (["--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "gama=0.5"],
     "lr_scheduler_args: 'gama' is not an argument of torch.optim.lr_scheduler.StepLR"),
    (["--lr_scheduler_type", "nope_xyz.Sched"],
     "lr_scheduler_type: 'nope_xyz.Sched': cannot import module 'nope_xyz'"),
    (["--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "step_size=1",
      "--lr_warmup_steps", "10"], "lr_warmup_steps: a custom lr_scheduler_type takes no"),
    (["--lr_scheduler", "linear", "--lr_scheduler_args", "num_cycles=2"],
     "lr_scheduler_args: 'num_cycles' is not an argument of the linear schedule; "
     "accepted: none"),
])
def test_bad_class_paths_stop_before_any_model_loads(tmp_path, tiny_sd15_dir, data,  # noqa: F811
                                                      capsys, flags, fragment):
    assert run(tmp_path, tiny_sd15_dir, data, "--max_train_steps", "1", *flags) == 2
    err = capsys.readouterr().err
    assert "Configuration error (1 problem)" in err and fragment in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
