"""tools/extract_lora.py: from (base, base merged with a known LoRA) it recovers that LoRA's
deltas, the file loads in diffusers and reproduces the tuned model, unchanged text encoders
are left out (--min_diff), and bad inputs stop with one line and write nothing."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from networks.kohya_file import read_lora
from tests.networks.helpers import (assert_outputs_close, file_modules,  # noqa: F401
                                    load_pipe, one_thread, outputs, peft_layers)
from tests.tools.lora_fixtures import deltas, loras, single_files  # noqa: F401
from tools import extract_lora, merge_lora


@pytest.fixture(scope="module")
def tuned_sd15(loras, tiny_sd15_dir, tmp_path_factory):  # noqa: F811
    """The tiny SD1.5 model with sd15_a (UNet + TE + LoCon, rank 4 / conv 2) baked in, as a
    single file: extraction reads a folder and a single file side by side."""
    out = tmp_path_factory.mktemp("tuned") / "tuned.safetensors"
    assert merge_lora.main(["--sd_model", str(tiny_sd15_dir), "--models",
                            str(loras["sd15_a"]), "--save_to", str(out), "--quiet"]) == 0
    return out


def test_extract_recovers_the_lora_and_loads_in_diffusers(tuned_sd15, loras, tiny_sd15_dir,  # noqa
                                                          tmp_path, capsys):
    out = tmp_path / "extracted.safetensors"
    assert extract_lora.main(["--model_org", str(tiny_sd15_dir), "--model_tuned",
                              str(tuned_sd15), "--save_to", str(out), "--dim", "4",
                              "--conv_dim", "2", "--clamp_quantile", "1", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "lora_te: 12 modules, Frobenius retained mean 1.0000" in text
    want, got = deltas(loras["sd15_a"]), deltas(out)
    assert got.keys() == want.keys()  # the same targets as training with conv_dim
    for stem, d in want.items():  # rank 4 (conv 2) holds them exactly, up to fp32 rounding
        torch.testing.assert_close(got[stem], d, rtol=1e-3, atol=2e-5,
                                   msg=lambda m, s=stem: f"{s}: {m}")
    sd, meta = read_lora(out)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4"
    assert '"conv_dim": "2"' in meta["ss_network_args"]
    assert meta["ss_base_model_version"] == "sd_v1" and "extracted" in meta["ss_training_comment"]
    assert all(v.dtype == torch.float32 for v in sd.values())

    # loads in diffusers, every module applied, and base + LoRA = the tuned model
    pipe = load_pipe(tiny_sd15_dir)
    pipe.load_lora_weights(str(tmp_path), weight_name=out.name, adapter_name="x")
    assert peft_layers(pipe.unet, "x") == file_modules(sd, "lora_unet")
    assert peft_layers(pipe.text_encoder, "x") == file_modules(sd, "lora_te")
    from library.models.loading import load_components
    c = load_components(str(tuned_sd15), model_config_dir=str(tiny_sd15_dir),
                        vae_dtype=torch.float32)
    assert_outputs_close(outputs(pipe, "sd15"), outputs(c.family.pipeline(c), "sd15"),
                         atol=5e-5)


def test_default_clamp_and_lower_rank_stay_close(tuned_sd15, loras, tiny_sd15_dir,  # noqa
                                                  tmp_path):
    out = tmp_path / "x.safetensors"
    assert extract_lora.main(["--model_org", str(tiny_sd15_dir), "--model_tuned",
                              str(tuned_sd15), "--save_to", str(out), "--dim", "3",
                              "--save_precision", "fp16", "--quiet"]) == 0
    sd = load_file(str(out))
    assert {v.dtype for v in sd.values()} == {torch.float16}
    assert not any("resnets" in k for k in sd)  # no --conv_dim: attention modules only
    want, got = deltas(loras["sd15_a"]), deltas(out)
    errs, bests = [], []
    for stem, d in got.items():
        # rank 3 of a rank-4 delta, factors clamped at their 99th percentile: the clamp
        # costs most where a small factor matrix has a few large entries
        s = torch.linalg.svdvals(want[stem].flatten(1))
        best = float(s[3:].norm() / s.norm())
        err = float(torch.linalg.matrix_norm((d - want[stem]).flatten(1)) / s.norm())
        assert err <= best + 0.2, stem
        errs.append(err)
        bests.append(best)
    assert sum(errs) / len(errs) <= sum(bests) / len(bests) + 0.1


def test_unchanged_text_encoders_are_left_out(loras, single_files, tiny_sdxl_dir,  # noqa: F811
                                              tmp_path, capsys):
    tuned = tmp_path / "tuned"  # xl_b trains the UNet only
    assert merge_lora.main(["--sd_model", str(tiny_sdxl_dir), "--models", str(loras["xl_b"]),
                            "--save_to", str(tuned), "--quiet"]) == 0
    out = tmp_path / "x.safetensors"
    assert extract_lora.main(["--model_org", str(single_files["sdxl"]), "--model_tuned",
                              str(tuned), "--save_to", str(out), "--dim", "2",
                              "--clamp_quantile", "1", "--quiet"]) == 0
    assert "text encoders are the same" in capsys.readouterr().out
    want, got = deltas(loras["xl_b"]), deltas(out)
    assert got.keys() == want.keys() and all(k.startswith("lora_unet_") for k in got)
    for stem, d in want.items():
        torch.testing.assert_close(got[stem], d, rtol=1e-3, atol=2e-5)
    _, meta = read_lora(out)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["ss_network_train_unet_only"] == "True"


@pytest.mark.parametrize("case", ["families", "exists", "not_model", "missing"])
def test_bad_inputs_exit_2_and_write_nothing(case, tiny_sd15_dir, tiny_sdxl_dir, loras,  # noqa
                                             tmp_path, capsys):
    org, tuned = tiny_sd15_dir, tiny_sd15_dir
    out = tmp_path / "x.safetensors"
    if case == "families":
        tuned, expect = tiny_sdxl_dir, "is sd15 but --model_tuned"
    elif case == "exists":
        out.write_bytes(b"keep")
        expect = "exists; pass --overwrite"
    elif case == "not_model":
        tuned, expect = loras["sd15_a"], "a LoRA file, not a base model"
    else:
        tuned, expect = tmp_path / "nope", f"--model_tuned {tmp_path / 'nope'}: not found"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert extract_lora.main(["--model_org", str(org), "--model_tuned", str(tuned),
                              "--save_to", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("extract_lora: error: ") and len(err.splitlines()) == 1
    assert expect in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
