"""tools/merge_lora.py and svd_merge_lora.py: a model merged with LoRAs gives the outputs of
the base model with the LoRAs loaded by diffusers; LoRA merges are exact (concat) or meet the
error they report (SVD); bad inputs stop with one line and write nothing."""
from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.networks.helpers import assert_outputs_close, load_pipe, one_thread, outputs  # noqa
from tests.tools.lora_fixtures import deltas, loras, single_files  # noqa: F401
from tools import merge_lora, svd_merge_lora

RATIOS = (0.8, -0.5)


def with_adapters(model_dir, files, ratios, family):
    """Outputs of the base pipeline with the LoRAs loaded through load_lora_weights."""
    pipe = load_pipe(model_dir)
    names = []
    for i, f in enumerate(files):
        pipe.load_lora_weights(str(f.parent), weight_name=f.name, adapter_name=f"l{i}")
        names.append(f"l{i}")
    pipe.set_adapters(names, adapter_weights=list(ratios))
    return outputs(pipe, family)


def single_file_outputs(path, config_dir, family):
    from library.models.loading import load_components
    c = load_components(str(path), family=family, model_config_dir=str(config_dir),
                        vae_dtype=torch.float32)
    return outputs(c.family.pipeline(c), family)


def test_merge_into_diffusers_folder_sd15(loras, tiny_sd15_dir, tmp_path, capsys):  # noqa
    files = [loras["sd15_a"], loras["sd15_b"]]
    out = tmp_path / "merged"
    assert merge_lora.main(["--sd_model", str(tiny_sd15_dir), "--models", *map(str, files),
                            "--ratios", *map(str, RATIOS), "--save_to", str(out),
                            "--quiet"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    merged = outputs(load_pipe(out), "sd15")
    want = with_adapters(tiny_sd15_dir, files, RATIOS, "sd15")
    assert_outputs_close(merged, want, atol=5e-5)
    base = outputs(load_pipe(tiny_sd15_dir), "sd15")
    assert not torch.allclose(merged["unet"], base["unet"], atol=1e-3)
    assert not torch.allclose(merged["te0"], base["te0"], atol=1e-3)
    # the VAE, tokenizer and scheduler came along unchanged
    for rel in ("vae/diffusion_pytorch_model.safetensors", "tokenizer/vocab.json",
                "scheduler/scheduler_config.json", "model_index.json"):
        assert (out / rel).read_bytes() == (tiny_sd15_dir / rel).read_bytes()

    # the other form on request: the same merge written as one fp16 single file
    one = tmp_path / "merged.safetensors"
    assert merge_lora.main(["--sd_model", str(tiny_sd15_dir), "--models", *map(str, files),
                            "--ratios", *map(str, RATIOS), "--save_to", str(one),
                            "--save_precision", "fp16", "--quiet"]) == 0
    assert {v.dtype for k, v in load_file(str(one)).items() if "diffusion_model" in k} == \
        {torch.float16}
    assert_outputs_close(single_file_outputs(one, tiny_sd15_dir, "sd15"), merged, atol=5e-3)


def test_merge_into_single_file_sdxl(loras, single_files, tiny_sdxl_dir, tmp_path):  # noqa
    files = [loras["xl_a"], loras["xl_b"]]  # xl_a: both TEs (OpenCLIP q/k/v fused) + LoCon
    out = tmp_path / "merged.safetensors"
    assert merge_lora.main(["--sd_model", str(single_files["sdxl"]), "--models",
                            *map(str, files), "--ratios", *map(str, RATIOS), "--save_to",
                            str(out), "--quiet"]) == 0
    src, got = load_file(str(single_files["sdxl"])), load_file(str(out))
    assert src.keys() == got.keys()
    assert all(got[k].dtype == v.dtype for k, v in src.items())
    assert torch.equal(src["first_stage_model.decoder.conv_in.weight"],
                       got["first_stage_model.decoder.conv_in.weight"])
    merged = single_file_outputs(out, tiny_sdxl_dir, "sdxl")
    want = with_adapters(tiny_sdxl_dir, files, RATIOS, "sdxl")
    assert_outputs_close(merged, want, atol=5e-5)


def test_exact_lora_merge_equals_applying_both(loras, tmp_path, capsys):  # noqa: F811
    a, b = loras["sd15_kohya"], loras["sd15_b"]  # sd-scripts' file with one of ours
    out = tmp_path / "both.safetensors"
    assert merge_lora.main(["--models", str(a), str(b), "--ratios", *map(str, RATIOS),
                            "--save_to", str(out), "--save_precision", "float",
                            "--quiet"]) == 0
    da, db, got = deltas(a), deltas(b), deltas(out)
    assert got.keys() == da.keys() | db.keys()
    for stem, d in got.items():
        want = RATIOS[0] * da.get(stem, 0) + RATIOS[1] * db.get(stem, 0)
        torch.testing.assert_close(d, want, rtol=1e-5, atol=1e-6)
    sd = load_file(str(out))
    stem = next(iter(db))
    assert sd[f"{stem}.lora_down.weight"].shape[0] == 4 + 3  # ranks concatenated
    assert "exact" in capsys.readouterr().out


def _reported(text: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r"^(lora_\w+): \d+ modules, relative error mean [\d.]+, worst ([\d.]+)",
                        text, re.M)}


@pytest.mark.parametrize("rank,conv,clamp", [("3", "1", None), ("7", "4", "1")])
def test_svd_merge_meets_its_reported_error(loras, tmp_path, capsys, rank, conv, clamp):  # noqa
    a, b = loras["sd15_a"], loras["sd15_b"]
    out = tmp_path / "svd.safetensors"
    args = ["--models", str(a), str(b), "--ratios", *map(str, RATIOS), "--new_rank", rank,
            "--new_conv_rank", conv, "--save_to", str(out), "--quiet"]
    assert svd_merge_lora.main(args + (["--clamp_quantile", clamp] if clamp else [])) == 0
    reported = _reported(capsys.readouterr().out)
    assert set(reported) == {"lora_unet", "lora_te"}
    da, db, got = deltas(a), deltas(b), deltas(out)
    worst: dict[str, float] = {}
    for stem, d in got.items():
        want = RATIOS[0] * da.get(stem, 0) + RATIOS[1] * db.get(stem, 0)
        err = float(torch.linalg.matrix_norm((d - want).flatten(1)) /
                    torch.linalg.matrix_norm(want.flatten(1)))
        part = "lora_unet" if stem.startswith("lora_unet") else "lora_te"
        worst[part] = max(worst.get(part, 0.0), err)
    for part, err in worst.items():
        assert err <= reported[part] + 1e-4, part
        assert err >= reported[part] - 1e-4, part  # reported is the truth, not a bound
    sd = load_file(str(out))
    ranks = {v.shape[0] for k, v in sd.items() if k.endswith("lora_down.weight")}
    if rank == "7":  # full rank without clamping: exact
        # 4 + 3 where both LoRAs have the module; a's own LoCon modules keep 4 (1x1) and 2
        # (3x3): an SVD never needs more than the rank it is given
        assert max(worst.values()) < 1e-5 and ranks == {7, 4, 2}
    else:
        assert ranks == {3, 1} and max(worst.values()) > 0.05


def _shifted(src, dst):
    """A copy whose first module is for a 2x wider layer."""
    sd = load_file(str(src))
    stem = sorted(k for k in sd if k.endswith(".lora_down.weight"))[0][:-len(".lora_down.weight")]
    d = sd[f"{stem}.lora_down.weight"]
    sd[f"{stem}.lora_down.weight"] = torch.zeros(d.shape[0], d.shape[1] * 2, *d.shape[2:])
    save_file(sd, str(dst))
    return dst, stem


@pytest.mark.parametrize("case", ["other_family", "shape", "not_lora", "exists", "ratios",
                                  "mixed_loras", "shape_loras"])
def test_bad_inputs_exit_2_and_write_nothing(case, loras, tiny_sd15_dir, tiny_sdxl_dir,  # noqa
                                             tmp_path, capsys):
    out = tmp_path / "out"
    model, models, extra, expect = tiny_sdxl_dir, [loras["xl_b"]], [], None
    if case == "other_family":
        models = [loras["sd15_b"]]
        expect = f"{loras['sd15_b']}: an SD1.5 LoRA, but the model is SDXL"
    elif case == "shape":
        bad, stem = _shifted(loras["xl_b"], tmp_path / "bad.safetensors")
        models = [bad]
        expect = f"{bad}: module {stem}: its delta is"
    elif case == "not_lora":
        models = [tiny_sd15_dir / "unet" / "diffusion_pytorch_model.safetensors"]
        expect = f"{models[0]}: not a LoRA file"
    elif case == "exists":
        out.mkdir()
        expect = "exists; pass --overwrite"
    elif case == "ratios":
        extra = ["--ratios", "1", "2"]
        expect = "--ratios has 2 values for 1 --models"
    elif case == "mixed_loras":
        model, models = None, [loras["xl_b"], loras["sd15_b"]]
        expect = "is an SDXL LoRA but"
    elif case == "shape_loras":
        bad, stem = _shifted(loras["sd15_b"], tmp_path / "bad.safetensors")
        model, models = None, [loras["sd15_b"], bad]
        expect = f"module {stem}: shapes differ"
    if model is None:
        out = tmp_path / "out.safetensors"
    args = (["--sd_model", str(model)] if model else []) + \
        ["--models", *map(str, models), "--save_to", str(out), *extra]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert merge_lora.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("merge_lora: error: ") and len(err.splitlines()) == 1
    assert expect in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    if case == "exists":
        assert not any(out.iterdir())
