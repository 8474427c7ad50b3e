"""Damaged and hostile inputs: the corrupt-file corpus for network_weights and resume, a
state folder carrying a malicious pickle, a full disk while saving, output paths that cannot
be used, and bounds (sample sizes, ranks) found by --dry_run. Each is one line naming the
file or key, exit 2 before training (1 during), never a traceback; the checks that can run
before the model loads do (the model loader is replaced by a tripwire to prove it)."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import train_network
from library.train.state import read_position
from tests.reliability.conftest import SAVE_EVERY_STEP, leftovers, run_inproc, tensors_equal


@pytest.fixture
def no_model_load(monkeypatch):
    def tripwire(*a, **k):
        raise AssertionError("the model was loaded before the problem was reported")
    monkeypatch.setattr(train_network, "load_components_for", tripwire)


def one_error(err: str, *needles: str) -> None:
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err[-2000:]


# ---- network_weights ---------------------------------------------------------------------
def _torn(src: Path, dst: Path):
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])


def _zero(src, dst):
    dst.write_bytes(b"")


def _bad_header(src, dst):
    data = bytearray(src.read_bytes())
    data[8:20] = b"{not json!!!"
    dst.write_bytes(bytes(data))


def _huge_header(src, dst):
    dst.write_bytes((2**60).to_bytes(8, "little") + src.read_bytes()[8:])


def _not_a_lora(src, dst):
    save_file({"text_model.embeddings.weight": torch.zeros(2, 2)}, str(dst))


def _other_family(src, dst):  # an SDXL LoRA's second text encoder
    save_file({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight":
               torch.zeros(2, 8), "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight":
               torch.zeros(8, 2)}, str(dst))


@pytest.mark.parametrize("damage, says", [
    (_torn, "not a readable .safetensors file"), (_zero, "not a readable .safetensors file"),
    (_bad_header, "not a readable .safetensors file"),
    (_huge_header, "not a readable .safetensors file"), (_not_a_lora, "no LoRA keys found"),
    (_other_family, "another model family")])
def test_a_bad_network_weights_file_is_refused_before_the_model_loads(
        damage, says, tmp_path, tiny_args, baseline, capsys, no_model_load):
    bad = tmp_path / "bad.safetensors"
    damage(baseline / "t.safetensors", bad)
    assert run_inproc(tiny_args(tmp_path / "out", 2, "--network_weights", str(bad))) == 2
    one_error(capsys.readouterr().err, f"network_weights: {bad}", says)
    assert not (tmp_path / "out").exists()


# ---- resume ----------------------------------------------------------------------------
def _rm(name):
    return lambda d: (d / name).unlink()


def _cut(name):
    return lambda d: (d / name).write_bytes((d / name).read_bytes()[:(d / name).stat()
                                                                     .st_size // 2])


def _flip(name):
    def f(d):
        data = bytearray((d / name).read_bytes())
        data[-1] ^= 1
        (d / name).write_bytes(bytes(data))
    return f


@pytest.mark.parametrize("damage, says", [
    (_rm("training.safetensors"), "training.safetensors is missing"),
    (_cut("training.safetensors"), "training.safetensors is damaged"),
    (_cut("lora.safetensors"), "lora.safetensors is damaged"),
    (_cut("state.json"), "state.json is damaged"),
    (_flip("training.json"), "training.json is damaged"),
    (_cut("manifest.json"), "manifest.json is damaged"),
    (_rm("manifest.json"), "is incomplete (no manifest.json"),
    (lambda d: [p.unlink() for p in d.iterdir()], "is not a tomlora state folder")])
def test_a_damaged_state_folder_is_refused_before_the_model_loads(
        damage, says, tmp_path, tiny_args, baseline, capsys, no_model_load):
    state = tmp_path / "t-step00000001-state"
    shutil.copytree(baseline / state.name, state)
    damage(state)
    assert run_inproc(tiny_args(tmp_path / "out", 3, "--resume", str(state))) == 2
    one_error(capsys.readouterr().err, "Resume error", str(state), says)


def test_a_state_of_another_network_is_refused_before_training(tmp_path, tiny_args, baseline,
                                                               capsys):
    state = baseline / "t-step00000001-state"
    assert run_inproc(tiny_args(tmp_path / "out", 3, "--network_dim", "4",
                                "--resume", str(state))) == 2
    one_error(capsys.readouterr().err, "Resume error", "the state was saved with another "
              "network (network_dim")
    assert not list((tmp_path / "out").glob("*.safetensors"))


class RunsCode:
    """Unpickling this runs a shell command, as a hostile training.pt would."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_state_folder_with_a_malicious_pickle_runs_no_code(tmp_path, tiny_args, baseline,
                                                             capsys, no_model_load):
    marker, state = tmp_path / "pwned", tmp_path / "shared-state"
    state.mkdir()
    shutil.copy(baseline / "t-step00000001-state" / "lora.safetensors", state)
    (state / "state.json").write_text('{"version": 1, "step": 1, "epoch": 0, '
                                      '"batches_done": 1, "seed": 7}')
    torch.save({"optimizer": RunsCode(marker)}, state / "training.pt")
    assert run_inproc(tiny_args(tmp_path / "out", 3, "--resume", str(state))) == 2
    one_error(capsys.readouterr().err, "older tomlora (training.pt, a pickle)",
              "unpickling a file can run code", "network_weights")
    assert not marker.exists()
    # and the state loader itself, called directly, refuses it the same way
    with pytest.raises(Exception, match="training.pt"):
        read_position(state)
    assert not marker.exists()


# ---- a full disk while saving ------------------------------------------------------------
def test_a_full_disk_inside_a_state_save_fails_cleanly(tmp_path, tiny_args, baseline, caplog):
    # save point 12 is the step-2 state's training.json (tests/reliability/conftest.py)
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR, logger="tomlora"):
        assert run_inproc(tiny_args(out, 3, *SAVE_EVERY_STEP), TOMLORA_FAULT="enospc@12") == 1
    assert f"training failed at step 2: cannot write {out / 't-step00000002-state'}: " in \
        caplog.text
    assert "No space left on device; the files saved before are intact" in caplog.text
    assert leftovers(out) == [] and not (out / ".tomlora.lock").exists()
    assert sorted(p.name for p in out.glob("*-state")) == ["t-step00000001-state"]
    read_position(out / "t-step00000001-state")
    for name in ("t-step00000001.safetensors", "t-step00000002.safetensors"):
        assert tensors_equal(out / name, baseline / name)


# ---- output paths ------------------------------------------------------------------------
def test_output_name_cannot_leave_output_dir(tmp_path, tiny_args, capsys, no_model_load):
    args = tiny_args(tmp_path / "a" / "b" / "out", 2)
    args[args.index("--output_name") + 1] = "../../x"
    assert run_inproc(args) == 2
    one_error(capsys.readouterr().err, "output_name: '../../x' is a file name stem")
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "a").exists()


def test_output_dir_under_a_file_is_refused_before_the_model_loads(tmp_path, tiny_args, capsys,
                                                                   no_model_load):
    (tmp_path / "afile").write_text("x")
    assert run_inproc(tiny_args(tmp_path / "afile" / "out", 2)) == 2
    one_error(capsys.readouterr().err, "output_dir:", "which is a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_output_dir_is_refused_before_the_model_loads(tmp_path, tiny_args,
                                                                    capsys, no_model_load):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    try:
        assert run_inproc(tiny_args(ro / "out", 2)) == 2
    finally:
        ro.chmod(0o755)
    one_error(capsys.readouterr().err, "output_dir: cannot write to")


# ---- bounds found by --dry_run -----------------------------------------------------------
def test_a_huge_sample_size_is_refused_by_dry_run_naming_the_line(tmp_path, tiny_args,
                                                                  capsys, no_model_load):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# samples\na toy --w 512 --h 512\na toy --w 100000 --h 100000\n")
    assert run_inproc(tiny_args(tmp_path / "out", 2, "--sample_prompts", str(prompts),
                                "--dry_run")) == 2
    one_error(capsys.readouterr().err, f"{prompts}:3: --w '100000': expected an integer from "
              "8 to 4096")


def test_a_rank_beyond_every_layer_is_refused_by_dry_run(tmp_path, tiny_args, capsys,
                                                         no_model_load):
    assert run_inproc(tiny_args(tmp_path / "out", 2, "--network_dim", "100000",
                                "--dry_run")) == 2
    one_error(capsys.readouterr().err, "network_dim = 100000 is more than any layer",
              "use at most 64")


def test_a_non_utf8_prompt_file_names_the_file(tmp_path, tiny_args, capsys, no_model_load):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a caf\u00e9 toy\n".encode("latin-1"))
    assert run_inproc(tiny_args(tmp_path / "out", 2, "--sample_prompts", str(prompts))) == 2
    one_error(capsys.readouterr().err, f"{prompts}: not UTF-8 text", "save the prompt file as "
              "UTF-8")
