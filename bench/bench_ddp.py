#!/usr/bin/env python
"""Multi-GPU benchmark of tomlora's data-parallel LoRA step (issue 12).

Run with torchrun, one process per GPU:

    torchrun --nproc_per_node 2 bench/bench_ddp.py --per_gpu_batch 2 --out $OUT/ddp2
    torchrun --nproc_per_node 1 bench/bench_ddp.py --per_gpu_batch 4 --out $OUT/ddp1x4
    python bench/bench_ddp.py --compare $OUT/ddp2 $OUT/ddp1x4

Each process builds the same full-size UNet (random weights, seeded) in bf16 and our LoRA
(rank 32, kohya targets), trains its slice of every global batch with
library.train.step.diffusion_loss (per-sample seeded noise and timesteps), averages the LoRA
gradients with library.train.distributed.average_gradients (the code train_network.py runs
under `accelerate launch`), clips and steps fused AdamW. Latents and text embeddings are
random tensors seeded per sample, so any split of a global batch sees the same data.
Rank 0 writes timing JSON and the fp32 LoRA weights, which `--compare` checks between runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_step import SD15_UNET, SDXL_UNET  # noqa: E402

TINY_SDXL = dict(SDXL_UNET, block_out_channels=(32, 32, 64), transformer_layers_per_block=(1, 1, 2),
                 attention_head_dim=(2, 2, 4), cross_attention_dim=64, norm_num_groups=8,
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
                 sample_size=8)
SHAPES = {  # name: (family, unet config, resolution, context dim, pooled dim)
    "sdxl-1024": ("sdxl", SDXL_UNET, 1024, 2048, 1280),
    "sd15-512": ("sd15", SD15_UNET, 512, 768, 0),
    "sdxl-tiny": ("sdxl", TINY_SDXL, 64, 64, 32),  # CPU smoke test of the script
}


def sample_data(j: int, family: str, reso: int, ctx: int, pooled: int, device):
    """Latents and conditioning of global sample j, the same on every process."""
    g = torch.Generator().manual_seed(10_000 + j)
    lat = torch.randn(1, 4, reso // 8, reso // 8, generator=g)
    cond = {"encoder_hidden_states": torch.randn(1, 77, ctx, generator=g)}
    if family == "sdxl":
        cond["pooled"] = torch.randn(1, pooled, generator=g)
    return lat.to(device), {k: v.to(device) for k, v in cond.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="sdxl-1024", choices=list(SHAPES))
    ap.add_argument("--per_gpu_batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"],
                    help="compute dtype of the frozen base (fp32 for the equivalence check)")
    ap.add_argument("--reso", type=int, help="override the workload's resolution")
    ap.add_argument("--out")
    ap.add_argument("--compare", nargs=2, metavar="DIR")
    a = ap.parse_args(argv)
    if a.compare:
        return compare(*a.compare)

    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    from library.models.loading import FAMILIES
    from library.train.distributed import average_gradients, shard
    from library.train.optimizers import make_optimizer
    from library.train.step import LossSettings, diffusion_loss
    from networks.lora import LoRANetwork
    from networks.targets import RankSpec, find_targets

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    family, unet_cfg, reso, ctx, pooled = SHAPES[a.workload]
    reso = a.reso or reso
    fam = FAMILIES[family]
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32

    torch.manual_seed(0)  # identical base and LoRA init on every process and in every run
    t0 = time.perf_counter()
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(unet_cfg)
    unet.to(dtype).requires_grad_(False).set_attn_processor(AttnProcessor2_0())
    net = LoRANetwork(find_targets(unet, [], (), family, RankSpec(a.rank, a.rank),
                                   train_unet=True, train_text_encoder=False)).to(device).attach()
    params = list(net.parameters())
    opt = make_optimizer("AdamW", [{"params": params}], 1e-4, {})
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear")
    settings = LossSettings()
    global_batch = a.per_gpu_batch * world

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step(i: int) -> torch.Tensor:
        ids = shard(list(range(i * global_batch, (i + 1) * global_batch)), rank, world)
        parts = [sample_data(j, family, reso, ctx, pooled, device) for j in ids]
        lat = torch.cat([p[0] for p in parts])
        cond = {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1]}
        b = len(ids)
        batch = {"loss_weight": torch.ones(b, device=device),
                 "sample_seed": torch.tensor([7_000 + j for j in ids])}
        if family == "sdxl":
            sizes = torch.tensor([[reso, reso]] * b)
            batch.update(original_size=sizes, crop_top_left=torch.zeros(b, 2),
                         target_size=sizes)
        loss = diffusion_loss(unet, fam, sched, lat, cond, batch, settings,
                              weight_dtype=dtype, autocast=autocast)
        loss.backward()
        average_gradients(params, world)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def sync():
        if cuda:
            torch.cuda.synchronize()

    step(0)
    sync()
    first = time.perf_counter() - t0
    for i in range(1, 1 + a.warmup):
        step(i)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    for i in range(1 + a.warmup, 1 + a.warmup + a.steps):
        step(i)
    sync()
    dt = time.perf_counter() - t1
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    peaks = [peak]
    if world > 1:
        t = torch.tensor([peak], device=device)
        gathered = [torch.zeros_like(t) for _ in range(world)]
        dist.all_gather(gathered, t)
        peaks = [float(x) for x in gathered]
    if rank == 0:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file
        save_file(net.kohya_state_dict(torch.float32), str(out / "lora.safetensors"))
        result = {"workload": a.workload, "resolution": reso, "dtype": a.dtype, "gpus": world,
                  "per_gpu_batch": a.per_gpu_batch,
                  "global_batch": global_batch, "steps": a.steps,
                  "images_per_s": global_batch * a.steps / dt, "step_ms": 1000 * dt / a.steps,
                  "peak_gib_per_gpu": peaks, "build_and_first_step_s": first,
                  "device": torch.cuda.get_device_name() if cuda else "cpu",
                  "torch": torch.__version__}
        (out / "result.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result), flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def compare(a_dir: str, b_dir: str) -> int:
    """Relative difference of the effective LoRA deltas (up @ down, all modules together)."""
    from safetensors.torch import load_file
    a = load_file(str(Path(a_dir) / "lora.safetensors"))
    b = load_file(str(Path(b_dir) / "lora.safetensors"))
    num = den = 0.0
    for k in a:
        if k.endswith("lora_up.weight"):
            down = k.replace("lora_up", "lora_down")
            da = a[k].flatten(1) @ a[down].flatten(1)
            db = b[k].flatten(1) @ b[down].flatten(1)
            num += (da - db).pow(2).sum().item()
            den += da.pow(2).sum().item()
    rel = (num / den) ** 0.5 if den else float("nan")
    print(json.dumps({"keys": len(a), "same_keys": a.keys() == b.keys(),
                      "relative_delta_difference": rel, "delta_norm": den ** 0.5}))
    return 0

if __name__ == "__main__":
    sys.exit(main())
