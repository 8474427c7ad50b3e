#!/usr/bin/env python
"""Benchmark of the LoRA tools on a full-size SDXL checkpoint: peak RSS and time of each.

Builds, tensor by tensor (never the whole model in memory), a single-file SDXL checkpoint
with random fp16 weights in the LDM layout (UNet, both text encoders, VAE: ~6.9 GB) from the
bundled configs, and two random kohya LoRAs on kohya's default targets (rank 32 and 16, fp16).
Then runs each tool as its own process under /usr/bin/time -v and reports the maximum resident
set size and the wall time:

    merge_lora   both LoRAs into the checkpoint (single file -> single file, fp16)
    extract_lora a rank-32 LoRA from (base, merged)      [--skip_extract leaves it out]
    resize_lora  rank 32 -> 8, and dynamic sv_fro 0.9
    merge_lora   the two LoRAs into one, exact; svd_merge_lora to rank 32
    extract      one module of each shape timed, times the count (--estimate_extract)

    python bench/bench_lora_tools.py --workdir /tmp/lora_tools_bench [--json out.json]

Put the work folder on a disk with ~15 GB free, outside the repository; it is deleted at the
end unless --keep. Weights' values do not change speed or memory, so random ones serve.
The largest tensor of SDXL is the second text encoder's token embedding (49408 x 1280, 121
MiB in fp16, 241 MiB as the fp32 copy a merge computes in).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def meta_ldm_layout(config_dir: Path) -> list[tuple[str, tuple[int, ...]]]:
    """(LDM key, shape) of every tensor of an SDXL single file, from configs on the meta
    device, with the names our exporter writes (library/models/export.py)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.models import export
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(config_dir / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir / "vae"))
        te1 = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir / "text_encoder"))
        te2 = CLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(config_dir / "text_encoder_2"))
    out = {export.UNET + k: v for k, v in export.unet_to_ldm(unet.state_dict(),
                                                             unet.config).items()}
    out.update({export.VAE + k: v for k, v in export.vae_to_ldm(vae.state_dict(),
                                                               vae.config).items()})
    n_pos = te1.config.max_position_embeddings
    out.update({export.TE1_SDXL + k: v for k, v in export.clip_to_ldm(te1.state_dict(),
                                                                      n_pos).items()})
    out.update({export.TE2_SDXL + k: v for k, v in
                export.open_clip_to_ldm(te2.state_dict()).items()})
    return sorted((k, tuple(v.shape)) for k, v in out.items())


def build_checkpoint(path: Path, config_dir: Path, seed: int = 0) -> int:
    """Random fp16 SDXL single file, one tensor in memory at a time; returns its size."""
    from library.lora_tools.st_io import StreamWriter
    layout = meta_ldm_layout(config_dir)
    g = torch.Generator().manual_seed(seed)
    with StreamWriter(path, [(k, torch.float16, s) for k, s in layout],
                      {"format": "pt"}) as w:
        for key, shape in layout:
            w.write(key, (torch.randn(shape, generator=g) * 0.02).half())
    return path.stat().st_size


def build_lora(path: Path, checkpoint: Path, rank: int, seed: int) -> int:
    """A random kohya LoRA (fp16, alpha = rank / 2) on kohya's default targets of the
    checkpoint: the UNet's transformer blocks and every text-encoder projection."""
    from library.lora_tools.extract import targets
    from library.lora_tools.model_files import open_model
    from networks.kohya_file import write_lora
    model = open_model(checkpoint)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for stem in targets(model, conv=False):
        shape = model.slots[stem][0].shape
        sd[f"{stem}.lora_down.weight"] = (torch.randn(rank, *shape[1:], generator=g)
                                          * 0.01).half()
        sd[f"{stem}.lora_up.weight"] = (torch.randn(shape[0], rank, *([1, 1] if len(shape)
                                        == 4 else []), generator=g) * 0.01).half()
        sd[f"{stem}.alpha"] = torch.tensor(rank / 2, dtype=torch.float16)
    write_lora(path, sd, {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                          "ss_network_alpha": str(rank / 2),
                          "ss_base_model_version": "sdxl_base_v1-0"})
    return path.stat().st_size


def extract_estimate(base: Path, tuned: Path, dim: int, device: str | None) -> dict:
    """The extract step timed on one module of each distinct shape (exact SVD, as the tool
    does it), times the number of modules of that shape: a whole SDXL extraction on a busy
    2-core machine takes longer than a benchmark session. Memory per module does not depend
    on how many came before, so the peak RSS of this process is the tool's."""
    from library.lora_tools import extract as ex
    from library.lora_tools.model_files import open_model
    from library.lora_tools.svd import default_device, low_rank
    device = default_device(device)
    b, t = open_model(base), open_model(tuned)
    stems = ex.targets(b, conv=False)
    by_shape: dict[tuple, list[str]] = {}
    for stem in stems:
        by_shape.setdefault(tuple(b.slots[stem][0].shape), []).append(stem)
    rows, total = [], 0.0
    for shape, group in sorted(by_shape.items()):
        t0 = time.time()
        d = ex.diff(b, t, group[0], device)
        low_rank(d, dim, clamp_quantile=0.99, device=device)
        sec = time.time() - t0
        total += sec * len(group)
        rows.append({"shape": list(shape), "modules": len(group), "s_per_module": round(sec, 2)})
    return {"modules": len(stems), "estimated_s": round(total), "device": device,
            "per_shape": rows}


def timed(name: str, cmd: list[str], env: dict) -> dict:
    """Run one tool under /usr/bin/time -v: its peak RSS (MiB), wall seconds, exit code."""
    t0 = time.time()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    wall = time.time() - t0
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    row = {"tool": name, "rc": proc.returncode, "wall_s": round(wall, 1),
           "peak_rss_mib": round(int(rss.group(1)) / 1024) if rss else None,
           "command": " ".join(Path(c).name if c.startswith("/") else c for c in cmd[1:])}
    if proc.returncode:
        row["stderr_tail"] = proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if lines:
        row["result"] = json.loads(lines[-1])
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--config_dir", type=Path, default=ROOT / "configs" / "models" / "sdxl")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--skip_extract", action="store_true")
    p.add_argument("--device", default=None, help="--device for the tools (SVDs)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--estimate_extract", nargs=2, type=Path, metavar=("BASE", "TUNED"),
                   help="only time extract_lora's per-module step on each distinct shape "
                        "of these two checkpoints and print the estimate (JSON)")
    a = p.parse_args(argv)
    if a.estimate_extract:
        print(json.dumps(extract_estimate(*a.estimate_extract, 32, a.device)))
        return 0
    wd = a.workdir
    wd.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    py = sys.executable
    base, lora, lora2 = wd / "base.safetensors", wd / "lora_r32.safetensors", \
        wd / "lora_r16.safetensors"
    results: dict = {"machine": {"cpus": os.cpu_count(), "torch_threads":
                                 torch.get_num_threads(), "cuda": torch.cuda.is_available()},
                     "runs": []}
    try:
        t0 = time.time()
        size = build_checkpoint(base, a.config_dir)
        results["checkpoint"] = {"bytes": size, "build_s": round(time.time() - t0, 1)}
        build_lora(lora, base, 32, 1)
        build_lora(lora2, base, 16, 2)
        results["loras"] = {"r32_bytes": lora.stat().st_size, "r16_bytes": lora2.stat().st_size}
        print(json.dumps(results), flush=True)
        dev = ["--device", a.device] if a.device else []
        runs = [
            ("merge_lora into checkpoint", [py, "tools/merge_lora.py", "--sd_model", str(base),
             "--models", str(lora), str(lora2), "--ratios", "0.8", "0.5", "--save_to",
             str(wd / "merged.safetensors"), "--quiet"]),
            ("resize_lora r32->8", [py, "tools/resize_lora.py", "--model", str(lora),
             "--save_to", str(wd / "r8.safetensors"), "--new_rank", "8", "--quiet", *dev]),
            ("resize_lora sv_fro 0.9", [py, "tools/resize_lora.py", "--model", str(lora),
             "--save_to", str(wd / "dyn.safetensors"), "--new_rank", "32", "--dynamic_method",
             "sv_fro", "--dynamic_param", "0.9", "--quiet", *dev]),
            ("merge_lora exact (r32+r16)", [py, "tools/merge_lora.py", "--models", str(lora),
             str(lora2), "--ratios", "0.8", "0.5", "--save_to", str(wd / "cat.safetensors"),
             "--quiet"]),
            ("svd_merge_lora to r32", [py, "tools/svd_merge_lora.py", "--models", str(lora),
             str(lora2), "--ratios", "0.8", "0.5", "--new_rank", "32", "--save_to",
             str(wd / "svd.safetensors"), "--quiet", *dev]),
        ]
        runs.append(("extract_lora dim 32, estimate", [py, "bench/bench_lora_tools.py",
                     "--workdir", str(wd), "--estimate_extract", str(base),
                     str(wd / "merged.safetensors"), *dev]))
        if not a.skip_extract:
            runs.append(("extract_lora dim 32", [py, "tools/extract_lora.py", "--model_org",
                         str(base), "--model_tuned", str(wd / "merged.safetensors"),
                         "--save_to", str(wd / "extracted.safetensors"), "--dim", "32",
                         "--save_precision", "fp16", "--quiet", *dev]))
        for name, cmd in runs:
            results["runs"].append(timed(name, cmd, env))
    finally:
        if a.json:
            a.json.write_text(json.dumps(results, indent=1))
        if not a.keep:
            shutil.rmtree(wd, ignore_errors=True)
    return 0 if all(r["rc"] == 0 for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
