"""LyCORIS algorithms through the real CLI on the tiny model: a kohya_ss-style LoKr config
runs unchanged, resumes exactly, samples, and its file loads back as network_weights; every
other algorithm trains a few steps and writes LyCORIS's tensors."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.test_train_e2e import read_scalars
from tests.train.test_loop import run
from tools.make_demo_dataset import make_dataset

# As kohya_ss's GUI writes a LyCORIS LoKr config (every key LyCORIS reads, defaults spelled).
KOHYA_SS_LOKR = [
    "--network_module", "lycoris.kohya", "--network_alpha", "2",
    "--network_args", "preset=attn-mlp", "conv_dim=4", "conv_alpha=1", "algo=lokr",
    "factor=4", "use_tucker=False", "use_scalar=True", "rank_dropout=0.0",
    "module_dropout=0.0", "dora_wd=False", "bypass_mode=False", "rank_dropout_scale=False",
    "train_norm=False", "decompose_both=False", "full_matrix=False"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("lyco") / "data"
    make_dataset(d, count=4, size=64, seed=3, repeats=2)
    return d


def test_kohya_ss_lokr_config_trains_resumes_and_reloads(tmp_path, tiny_sd15_dir, data):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a purple star --w 64 --h 64 --s 2\n")
    assert run(tmp_path / "a", tiny_sd15_dir, data, *KOHYA_SS_LOKR, "--max_train_steps", "4",
               "--save_every_n_steps", "2", "--save_state", "--sample_every_n_steps", "4",
               "--sample_prompts", str(prompts)) == 0
    out = tmp_path / "a" / "out"
    sd = load_file(str(out / "t.safetensors"))
    assert any(k.endswith(".lokr_w1") for k in sd) and not any("lora_down" in k for k in sd)
    assert not any(k.endswith(".scalar") for k in sd)  # folded in, as LyCORIS writes it
    with safe_open(str(out / "t.safetensors"), "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya" and '"algo": "lokr"' in \
        meta["ss_network_args"]
    assert list((out / "sample").glob("*.png"))
    # resume from step 2 reaches the same losses and weights
    assert run(tmp_path / "b", tiny_sd15_dir, data, *KOHYA_SS_LOKR, "--max_train_steps", "4",
               "--resume", str(out / "t-step00000002-state")) == 0
    a = read_scalars(tmp_path / "a" / "logs")["loss/current"]
    b = read_scalars(tmp_path / "b" / "logs")["loss/current"]
    assert b == pytest.approx(a[2:], abs=1e-6)
    wb = load_file(str(tmp_path / "b" / "out" / "t.safetensors"))
    for k in sd:
        torch.testing.assert_close(sd[k], wb[k], atol=1e-6, rtol=0)
    # the file starts another run (network_weights, strict)
    assert run(tmp_path / "c", tiny_sd15_dir, data, *KOHYA_SS_LOKR, "--max_train_steps", "1",
               "--network_weights", str(out / "t.safetensors")) == 0


# make test runs LoHa; the others (each ~15 s on 2 cores) run with the loss-guard tier
# (CUDA or TOMLORA_GUARD=1), where tests/train/test_loss_guard.py also covers every algorithm.
SLOW = pytest.mark.skipif(not torch.cuda.is_available() and
                          os.environ.get("TOMLORA_GUARD") != "1",
                          reason="guard tier: CUDA or TOMLORA_GUARD=1")


@pytest.mark.parametrize("flags,marker", [
    (["--network_type", "loha", "--network_args", "conv_dim=2"], ".hada_w1_a"),
    pytest.param(["--network_args", "dora_wd=True"], ".dora_scale", marks=SLOW),
    pytest.param(["--network_module", "lycoris.kohya", "--network_args", "algo=ia3",
                  "preset=ia3"], ".on_input", marks=SLOW),
    pytest.param(["--network_module", "lycoris.kohya", "--network_args", "algo=full",
                  "preset=unet-transformer-only"], ".diff_b", marks=SLOW),
    pytest.param(["--network_module", "lycoris.kohya", "--network_args", "algo=locon",
                  "use_tucker=True", "preset=unet-convblock-only", "conv_dim=2"],
                 ".lora_mid.weight", marks=SLOW),
], ids=["loha", "dora", "ia3", "full", "locon-tucker"])
def test_algorithm_trains_and_moves(flags, marker, tmp_path, tiny_sd15_dir, data):
    assert run(tmp_path, tiny_sd15_dir, data, *flags, "--max_train_steps", "2",
               "--learning_rate", "1e-2", "--batch_qkv_lora", "true") == 0
    sd = load_file(str(tmp_path / "out" / "t.safetensors"))
    assert any(k.endswith(marker) for k in sd)
    # the zero-initialised side moved: the network is no longer the base model
    moved = [k for k in sd if k.endswith(("hada_w2_a", "lora_up.weight", ".weight", ".diff"))
             and not k.endswith("lora_down.weight") and float(sd[k].abs().sum()) > 0]
    assert moved


def test_bad_lycoris_args_are_one_error_each(tmp_path, tiny_sd15_dir, data, capsys):
    assert run(tmp_path, tiny_sd15_dir, data, "--network_module", "lycoris.kohya",
               "--network_args", "algo=glora", "block_dims=1", "preset=everything",
               "train_norm=True") == 2
    err = capsys.readouterr().err
    for what in ("algo: GLoRA is not supported", "block_dims: a networks.lora",
                 "preset: unknown preset 'everything'", "train_norm: LyCORIS's norm"):
        assert what in err, err
