"""Files shared by the LoRA tool tests (resize, merge, extract): LoRAs our writer made for
the tiny models, a file written the way sd-scripts writes them, and the tiny models as single
files. Import the fixtures into a test module to use them."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from networks.targets import RankSpec
from tests.networks.helpers import load_pipe, random_network, save


def deltas(path: Path) -> dict[str, torch.Tensor]:
    """Every module's alpha/rank * up @ down in fp32, computed here from the raw tensors."""
    sd = load_file(str(path))
    out = {}
    for key in sd:
        if key.endswith(".lora_down.weight"):
            stem = key[: -len(".lora_down.weight")]
            down, up = sd[key].float(), sd[f"{stem}.lora_up.weight"].float()
            rank = down.shape[0]
            alpha = float(sd[f"{stem}.alpha"].float()) if f"{stem}.alpha" in sd else rank
            out[stem] = (up.flatten(1) @ down.flatten(1)).reshape(
                up.shape[0], *down.shape[1:]) * (alpha / rank)
    return out


def sd_scripts_style(src: Path, dst: Path) -> Path:
    """What sd-scripts' networks/lora.py writes: fp16 tensors, fp16 alphas that differ from
    module to module (here 1..4, baked into lora_up so the deltas stay those of `src`), and
    no metadata of ours."""
    sd = load_file(str(src))
    out = {}
    for i, stem in enumerate(sorted(k[:-len(".alpha")] for k in sd if k.endswith(".alpha"))):
        old = float(sd[f"{stem}.alpha"])
        new = float(1 + i % 4)
        out[f"{stem}.lora_down.weight"] = sd[f"{stem}.lora_down.weight"].half()
        out[f"{stem}.lora_up.weight"] = (sd[f"{stem}.lora_up.weight"] * (old / new)).half()
        out[f"{stem}.alpha"] = torch.tensor(new, dtype=torch.float16)
    save_file(out, str(dst), metadata={"ss_network_module": "networks.lora",
                                       "ss_network_dim": "4", "ss_network_alpha": "Dynamic"})
    return dst


@pytest.fixture(scope="session")
def loras(tiny_sd15_dir, tiny_sdxl_dir, tmp_path_factory) -> dict[str, Path]:
    """sd15_a: UNet+TE rank 4 alpha 2 with LoCon (conv 2, alpha 1); sd15_b: rank 3 UNet+TE;
    xl_a: UNet+both TEs rank 4 alpha 4 + LoCon, fp16; xl_b: rank 2 UNet only;
    sd15_kohya: sd15_a as sd-scripts writes it."""
    d = tmp_path_factory.mktemp("tool_loras")
    sd = load_pipe(tiny_sd15_dir)
    out = {"sd15_a": save(random_network(sd, "sd15", RankSpec(4, 2.0, 2, 1.0), seed=11),
                          d / "sd15_a.safetensors", "sd15", sd),
           "sd15_b": save(random_network(sd, "sd15", RankSpec(3, None), seed=12),
                          d / "sd15_b.safetensors", "sd15", sd)}
    xl = load_pipe(tiny_sdxl_dir)
    out["xl_a"] = save(random_network(xl, "sdxl", RankSpec(4, 4.0, 2, 2.0), seed=13),
                       d / "xl_a.safetensors", "sdxl", xl, precision="fp16")
    out["xl_b"] = save(random_network(xl, "sdxl", RankSpec(2, 1.0), te=False, seed=14),
                       d / "xl_b.safetensors", "sdxl", xl)
    out["sd15_kohya"] = sd_scripts_style(out["sd15_a"], d / "sd15_kohya.safetensors")
    return out


@pytest.fixture(scope="session")
def single_files(tiny_sd15_dir, tiny_sdxl_dir, tmp_path_factory) -> dict[str, Path]:
    """The tiny models as single LDM-layout .safetensors files."""
    from tools.make_tiny_model import write_single_file
    d = tmp_path_factory.mktemp("tool_single")
    return {"sd15": write_single_file(tiny_sd15_dir, d / "sd15.safetensors"),
            "sdxl": write_single_file(tiny_sdxl_dir, d / "sdxl.safetensors")}
