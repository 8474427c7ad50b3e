#!/usr/bin/env python
"""GPU benchmark: tomlora's LoRA training step beside the diffusers-example reference.

Both run on full-size SD1.5 / SDXL UNets with random weights (speed does not depend on the
values), bf16 frozen base, fp32 LoRA weights (rank 32 on every Linear / 1x1 conv inside the
transformer blocks: kohya's default targets), bf16 autocast, SDPA, cached latents and
text-encoder outputs (random tensors of the right shapes), max_grad_norm 1.0.

- reference: diffusers UNet + peft `add_adapter(LoraConfig(...))` + torch AdamW, the step
  written as the diffusers example scripts write it;
- ours: the same UNet with networks.targets + networks.lora.LoRANetwork, our optimizer
  registry (fused AdamW on CUDA) and library.train.step.diffusion_loss, i.e. the code path
  train_network.py runs.

Reports images/s, ratio to the reference, MFU (FLOPs of one step from
torch.utils.flop_counter over a bf16 8192^3 matmul measured in the same run), peak
torch.cuda.max_memory_allocated of the training steps (counted from the end of the build,
resident weights included: the build makes fp32 weights on the GPU before casting them, which
a training run loading fp16 files never does; `build_peak_gib` in the JSON has that figure)
and the time from building the UNet to the end of step 1.

    python bench/bench_step.py [--workloads sd15-512-b1,...] [--steps 20] [--json out.json]
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)
WORKLOADS = {
    "sd15-512-b1": ("sd15", 512, 1), "sd15-512-b4": ("sd15", 512, 4),
    "sd15-512-b16": ("sd15", 512, 16), "sdxl-1024-b1": ("sdxl", 1024, 1),
    "sdxl-1024-b4": ("sdxl", 1024, 4),
    "sd15-64-b1": ("sd15", 64, 1), "sdxl-64-b1": ("sdxl", 64, 1),  # CPU smoke tests
}
# Module-name suffixes of kohya's default targets, for peft's target_modules.
PEFT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                "ff.net.2"]


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: smoke test of the script only


def build_unet(family: str, dtype=torch.bfloat16):
    from diffusers import UNet2DConditionModel
    with torch.device(DEVICE):
        unet = UNet2DConditionModel.from_config(SD15_UNET if family == "sd15" else SDXL_UNET)
    unet.to(dtype).requires_grad_(False)
    from diffusers.models.attention_processor import AttnProcessor2_0
    unet.set_attn_processor(AttnProcessor2_0())
    return unet


def make_batch(family: str, reso: int, b: int):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    lat = torch.randn(b, 4, reso // 8, reso // 8, device=DEVICE, generator=g)
    ctx = torch.randn(b, 77, 768 if family == "sd15" else 2048, device=DEVICE, generator=g)
    cond = {"encoder_hidden_states": ctx}
    # per-sample noise seeds, as the trainer's collate gives them (library/data/dataset.py)
    batch = {"loss_weight": torch.ones(b, device=DEVICE), "sample_seed": torch.arange(b)}
    if family == "sdxl":
        cond["pooled"] = torch.randn(b, 1280, device=DEVICE, generator=g)
        sizes = torch.tensor([[reso, reso]] * b)
        batch.update(original_size=sizes, crop_top_left=torch.zeros(b, 2), target_size=sizes)
    return lat, cond, batch


def scheduler():
    from diffusers import DDPMScheduler
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear")


def autocast():
    return torch.autocast(DEVICE, dtype=torch.bfloat16)


def reference_setup(family: str, rank: int):
    from peft import LoraConfig
    unet = build_unet(family)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                target_modules=PEFT_TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    sched = scheduler()
    from library.models.loading import FAMILIES
    fam = FAMILIES[family]

    def step(lat, cond, batch):
        noise = torch.randn_like(lat)
        t = torch.randint(0, 1000, (lat.shape[0],), device=lat.device).long()
        noisy = sched.add_noise(lat, noise, t).to(torch.bfloat16)
        with autocast():
            pred = unet(noisy, t, cond["encoder_hidden_states"].to(torch.bfloat16),
                        **fam.unet_inputs(cond, batch)).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return unet, step, len(params) // 2


VARIANTS = {  # name -> the [training] / [model] / [optimizer] settings of train_network.py
    "ours": {},
    "ours+compile": {"compile": True},
    "ours+compile+cl": {"compile": True, "channels_last": True},
    "ours+compile-cg": {"compile": True, "compile_mode": "reduce-overhead"},
    "lowmem": {"gradient_checkpointing": True, "fp8_base": True, "optimizer": "AdamW8bit"},
    "lowmem+compile": {"gradient_checkpointing": True, "fp8_base": True,
                       "optimizer": "AdamW8bit", "compile": True},
    "ours+gc": {"gradient_checkpointing": True},
    "ours+graphs": {"cuda_graphs": True},
    "ours+graphs+compile": {"cuda_graphs": True, "compile": True},
    "ours+graphs+compile+cl": {"cuda_graphs": True, "compile": True, "channels_last": True},
    "ours+graphs+cudnn": {"cuda_graphs": True, "sdpa_backend": "cudnn"},
    "ours+graphs+compile+cudnn": {"cuda_graphs": True, "compile": True, "sdpa_backend": "cudnn"},
    "ours+graphs+compile+efficient": {"cuda_graphs": True, "compile": True,
                                      "sdpa_backend": "efficient"},
    # the LoRA input cast to fp32 before its autocast matmul, as before 2026-12-04
    "ours+graphs+cudnn+fp32cast": {"cuda_graphs": True, "sdpa_backend": "cudnn",
                                   "fp32_cast": True, "batch_qkv_lora": False},
    # batch_qkv_lora is on in every row above (the trainer's default); these turn it off
    "ours+graphs+cudnn-qkv": {"cuda_graphs": True, "sdpa_backend": "cudnn",
                              "batch_qkv_lora": False},
    "ours+graphs+compile+cudnn-qkv": {"cuda_graphs": True, "compile": True,
                                      "sdpa_backend": "cudnn", "batch_qkv_lora": False},
}


def ours_setup(family: str, rank: int, variant: str = "ours", dtype=torch.bfloat16):
    """Our step, set up with the functions train_network.py calls, in its order: storage
    (fp8_base) -> LoRA attach -> speed toggles (channels_last, compile) -> optimizer."""
    from types import SimpleNamespace

    from library.models.attention import store_fp8
    from library.models.loading import FAMILIES
    from library.train.optimizers import make_optimizer
    from library.train.speed import configure_speed, step_begin, training_unet
    from library.train.step import LossSettings, diffusion_loss
    from networks.lora import LoRANetwork
    from networks.targets import RankSpec, find_targets
    v = VARIANTS[variant]
    fam = FAMILIES[family]
    unet = build_unet(family, dtype)
    if v.get("gradient_checkpointing"):
        unet.enable_gradient_checkpointing()
    if v.get("fp8_base"):
        store_fp8(unet, dtype)
    net = LoRANetwork(find_targets(unet, [], (), family, RankSpec(rank, rank),
                                   train_unet=True, train_text_encoder=False)).to(DEVICE).attach()
    if v.get("fp32_cast"):
        import types
        for m in net:
            m.lora_input = types.MethodType(lambda self, x: x.to(self.lora_down.weight.dtype), m)
    speed = SimpleNamespace(compile=v.get("compile", False),
                            compile_mode=v.get("compile_mode", "default"),
                            channels_last=v.get("channels_last", False),
                            batch_qkv_lora=v.get("batch_qkv_lora", True),  # as the trainer
                            cuda_graphs=v.get("cuda_graphs", False),
                            gradient_checkpointing=v.get("gradient_checkpointing", False))
    configure_speed(unet, speed, net)
    call, _ = training_unet(unet, net, speed, DEVICE)
    params = list(net.parameters())
    opt = make_optimizer(v.get("optimizer", "AdamW"), [{"params": params}], 1e-4, {})
    sched = scheduler()
    settings = LossSettings()
    ac = autocast if dtype != torch.float32 else contextlib.nullcontext

    def step(lat, cond, batch):
        step_begin(speed)
        loss = diffusion_loss(call, fam, sched, lat, cond, batch, settings,
                              weight_dtype=dtype, autocast=ac)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return unet, step, len(net)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def matmul_peak() -> float:
    if DEVICE == "cpu":
        return 1e12
    a = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync()
    return 2 * 8192 ** 3 * 10 / (time.perf_counter() - t0)


FLOP_KINDS = {"attention": ("attention",), "convolution": ("convolution",),
              "matmul": ("mm", "addmm", "bmm", "baddbmm")}
STEP_FLOPS_BY_KIND: dict = {}  # workload -> {kind: flops}, beside `flops` (the totals)


def step_flops(step, lat, cond, batch, workload: str = "") -> float:
    """FLOPs of one step (forward + backward); the split by KERNEL_KINDS' compute kinds goes
    to STEP_FLOPS_BY_KIND[workload], so the profile can give each kind's TFLOP/s."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        step(lat, cond, batch)
    split = {}
    for op, n in fc.get_flop_counts().get("Global", {}).items():
        name = str(op).split(".")[1] if "." in str(op) else str(op)
        kind = next((k for k, pats in FLOP_KINDS.items()
                     if any(p in name if k == "attention" else name.startswith(p)
                            for p in pats)), "other")
        split[kind] = split.get(kind, 0) + int(n)
    STEP_FLOPS_BY_KIND[workload] = split
    return float(fc.get_total_flops())


def setup(kind: str, family: str, rank: int, dtype=torch.bfloat16):
    from library.models.attention import set_sdpa_backend
    torch._dynamo.reset()  # each kind compiles (or not) on its own
    set_sdpa_backend(VARIANTS.get(kind, {}).get("sdpa_backend", "auto"))  # as the trainer
    if kind == "reference":
        return reference_setup(family, rank)
    return ours_setup(family, rank, kind, dtype)


def gpu_profile(step, lat, cond, batch, n: int = 3) -> dict:
    """Share of the wall time the GPU is busy running kernels, and kernels per step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    sync()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step(lat, cond, batch)
        sync()
    wall = time.perf_counter() - t0
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    busy = sum(e.device_time for e in kernels) / 1e6  # us -> s (kernels do not overlap here)
    return {"gpu_busy": busy / wall, "kernels_per_step": len(kernels) / n,
            "gpu_ms_per_step": 1000 * busy / n, **kernel_breakdown(kernels, n)}


# Kernel name -> where the time goes; the first pattern found in the lower-cased name wins.
# Attention first (cuDNN's fused attention is also a "cudnn" kernel), then convolutions
# (cuDNN / CUTLASS implicit GEMMs: fprop, dgrad, wgrad), then the remaining GEMMs.
KERNEL_KINDS = [
    ("attention", ("flash", "fmha", "sdpa", "attention", "attn")),
    ("convolution", ("conv", "fprop", "dgrad", "wgrad", "implicit")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "sm80_", "splitk")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("norm", ("norm", "welford")),
    ("fused elementwise (inductor)", ("triton",)),
    ("copy", ("memcpy", "memset", "copy", "cat")),
    ("elementwise / reduction", ("elementwise", "reduce", "vectorized", "unrolled")),
]


def kernel_breakdown(kernels, n: int) -> dict:
    """GPU ms per step by kind of kernel (KERNEL_KINDS) and the ten costliest kernels."""
    by_kind, by_name = {}, {}
    for e in kernels:
        name = e.name.lower()
        kind = next((k for k, pats in KERNEL_KINDS if any(p in name for p in pats)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + e.device_time / 1e3 / n
        by_name[e.name] = by_name.get(e.name, 0.0) + e.device_time / 1e3 / n
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:10]
    return {"gpu_ms_by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
            "top_kernels_ms": [[name[:160], ms] for name, ms in top]}


def run(kind: str, workload: str, rank: int, steps: int, warmup: int, peak: float,
        flops: dict, profile_it: bool) -> dict:
    family, reso, b = WORKLOADS[workload]
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    unet, step, modules = setup(kind, family, rank)
    lat, cond, batch = make_batch(family, reso, b)
    build_peak = 0.0
    if DEVICE == "cuda":  # the build makes fp32 weights on the GPU before the cast; a
        # training run loads fp16/bf16 weights, so the step peak is counted from here
        build_peak = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    step(lat, cond, batch)
    sync()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        step(lat, cond, batch)
    sync()
    t1 = time.perf_counter()
    for _ in range(steps):
        loss = step(lat, cond, batch)
    sync()
    dt = time.perf_counter() - t1
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0
    if workload not in flops:  # counted on an eager step: the counter does not see into
        if kind in ("reference", "ours"):  # compiled code or CUDA graph replays
            flops[workload] = step_flops(step, lat, cond, batch, workload)
        else:
            _, eager_step, _ = ours_setup(family, rank)
            flops[workload] = step_flops(eager_step, lat, cond, batch, workload)
            del eager_step
    result = {"kind": kind, "workload": workload, "lora_modules": modules,
              "images_per_s": b * steps / dt, "step_ms": 1000 * dt / steps,
              "tflop_per_image": flops[workload] / b / 1e12,
              "mfu": flops[workload] * steps / dt / peak, "peak_gib": peak_gib,
              "build_peak_gib": build_peak,
              "first_step_s": first, "loss": float(loss)}
    if profile_it and DEVICE == "cuda":
        result.update(gpu_profile(step, lat, cond, batch))
        split = STEP_FLOPS_BY_KIND.get(workload, {})
        result["tflops_by_kind"] = {  # achieved TFLOP/s of each compute kind in this step
            k: split[k] / (ms / 1e3) / 1e12 for k, ms in result["gpu_ms_by_kind"].items()
            if split.get(k) and ms > 0}
    del unet, step
    return result


def guard(workload: str, kinds: list[str], rank: int, steps: int) -> list[dict]:
    """Loss curves over `steps` steps, each step with its own noise seeds, of every kind
    against our eager fp32 run on the same data; the LoRA trains as in real runs, so any
    numerical drift of an optimisation accumulates in the curve."""
    family, reso, b = WORKLOADS[workload]
    curves = {}
    for kind in ["fp32"] + [k for k in kinds if k != "reference"]:
        torch.manual_seed(0)
        unet, step, _ = setup("ours" if kind == "fp32" else kind, family, rank,
                              torch.float32 if kind == "fp32" else torch.bfloat16)
        lat, cond, batch = make_batch(family, reso, b)
        losses = []
        for i in range(steps):
            batch["sample_seed"] = torch.arange(b) + 1000 * i
            losses.append(float(step(lat, cond, batch)))
        curves[kind] = losses
        del unet, step
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    ref = torch.tensor(curves["fp32"])
    rows = []
    for kind, c in curves.items():
        rel = ((torch.tensor(c) - ref).abs() / ref.abs()).tolist()
        rows.append({"guard": workload, "kind": kind, "steps": steps,
                     "max_rel_diff": max(rel), "mean_rel_diff": sum(rel) / len(rel),
                     "first_loss": c[0], "last_loss": c[-1]})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="sd15-512-b1,sd15-512-b16,sdxl-1024-b1,sdxl-1024-b4")
    ap.add_argument("--kinds", default="reference,ours",
                    help="reference and any of: " + ", ".join(VARIANTS))
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="GPU busy share and kernels/step")
    ap.add_argument("--guard", help="a workload: loss curves of every kind vs eager fp32")
    ap.add_argument("--guard_steps", type=int, default=50)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = matmul_peak()
    import diffusers
    env = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
           "torch": torch.__version__, "diffusers": diffusers.__version__,
           "matmul_tflops": peak / 1e12, "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(env), flush=True)
    kinds = a.kinds.split(",")
    rows, flops, guards = [], {}, []
    out = {"env": env, "rows": rows, "guard": guards}

    def save():
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=1))
    for w in [w for w in a.workloads.split(",") if w]:
        for kind in kinds:
            try:
                r = run(kind, w, a.rank, a.steps, a.warmup, peak, flops, a.profile)
            except Exception as e:  # noqa: BLE001 - one failing variant must not end the run
                r = {"kind": kind, "workload": w, "error": f"{type(e).__name__}: {e}"[:500]}
            rows.append(r)
            print(json.dumps(r), flush=True)
            save()
    if a.guard:
        guards += guard(a.guard, kinds, a.rank, a.guard_steps)
        for g in guards:
            print(json.dumps(g), flush=True)
        save()
    print(f"\n| workload | kind | LoRA modules | images/s | x ref | MFU | peak GiB | "
          "build+first step s | GPU busy | kernels/step |\n|---|---|---|---|---|---|---|---|---|---|")
    ref = {r["workload"]: r["images_per_s"] for r in rows if r["kind"] == "reference"
           and "error" not in r}
    for r in rows:
        if "error" in r:
            print(f"| {r['workload']} | {r['kind']} | error: {r['error'][:120]} |")
            continue
        ratio = r["images_per_s"] / ref[r["workload"]] if r["workload"] in ref else float("nan")
        busy = f"{100 * r['gpu_busy']:.0f}%" if "gpu_busy" in r else "-"
        kern = f"{r['kernels_per_step']:.0f}" if "kernels_per_step" in r else "-"
        print(f"| {r['workload']} | {r['kind']} | {r['lora_modules']} | {r['images_per_s']:.2f} "
              f"| {ratio:.2f} | {100 * r['mfu']:.1f}% | {r['peak_gib']:.1f} | "
              f"{r['first_step_s']:.1f} | {busy} | {kern} |")
    for r in rows:
        if "gpu_ms_by_kind" in r:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in r["gpu_ms_by_kind"].items())
            print(f"GPU ms per step, {r['workload']} {r['kind']}: {parts}")
            rates = ", ".join(f"{k} {v:.0f}" for k, v in r.get("tflops_by_kind", {}).items())
            print(f"  achieved TFLOP/s by kind: {rates}")
    for g in guards:
        print(f"guard {g['guard']} {g['kind']}: max rel diff {g['max_rel_diff']:.4f}, mean "
              f"{g['mean_rel_diff']:.4f} over {g['steps']} steps")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
