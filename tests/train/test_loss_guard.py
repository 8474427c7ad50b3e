"""Correctness guard of the speed and memory options (issue 11): over 50 steps, the loss curve
of each option stays within tolerance of the eager fp32 run on the same data and seeds.

Every run goes through the real CLI (train_network.main) on the tiny random SD1.5 model, 50
steps at batch 2, and the curve is read back from the TensorBoard event file. The deviation of
two curves is mean |a_i - b_i| / mean |a_i| over the 50 steps (the same noise and timesteps
reach both runs at every step, so equal training gives equal losses step by step).

The guard can fail: `test_the_guard_sees_a_lora_that_does_not_learn` checks that a run whose
LoRA never moves (learning rate 1e-12) lies far outside every tolerance used here.

A tier of its own: 50-step runs cost minutes on a 2-core CPU, so the module runs where CUDA
is (the device machine, where the fp32 options run on the GPU too) or when TOMLORA_GUARD=1;
`make test` keeps the 3- and 4-step versions (tests/train/test_speed.py and friends).
docs/BENCHMARKS.md records the measured deviations.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.test_train_e2e import read_scalars
from tests.train.test_loop import run
from tools.make_demo_dataset import make_dataset

STEPS = 50
# The reference: eager fp32 with the defaults (latents cached: unset means on when valid).
# lr 3e-3 so that 50 steps move the loss clearly (the lr-0 check).
BASE = ["--max_train_steps", str(STEPS), "--learning_rate", "3e-3"]
FP32_TOL = 2e-3     # fp32 options that only reorder arithmetic
BF16_TOL = 0.01     # bf16 runs (the eager bf16 run itself is the first of them)
APPROX_TOL = 0.02   # options that round on purpose: 8-bit optimizer states, fp8 weights
# Cached latents are one VAE posterior sample per image, drawn when the cache is built; the
# uncached run draws a fresh sample every step: other inputs, not other arithmetic.
SAMPLE_TOL = 0.03
# bitsandbytes keeps 32-bit states for tensors under 4096 elements, which is every LoRA tensor
# of the tiny model; min_8bit_size=0 makes the guard exercise the 8-bit states themselves.
EIGHT_BIT = ["--optimizer_args", "min_8bit_size=0"]
PRESETS = Path(__file__).resolve().parents[2] / "configs" / "presets"
# The eager step: on CUDA, a run without speed keys takes the fast path (CUDA graphs, cuDNN
# attention first; library/train/fast_path.py), so the reference turns it off. The option
# cases below run on top of the default path.
EAGER = ["--cuda_graphs", "false", "--sdpa_backend", "torch"]
# The reference of the UNet-only options: eager fp32, the text encoders run every step.
UNET_ONLY_UNCACHED = ["--network_train_unet_only", "--cache_text_encoder_outputs", "false",
                      *EAGER]

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TOMLORA_GUARD") != "1",
    reason="50-step loss-curve guard: runs on the device machine (CUDA) or with TOMLORA_GUARD=1")
GPU_ONLY = pytest.mark.skipif(not torch.cuda.is_available(),
                              reason="bf16 autocast, CUDA graphs, GPU compile, SDPA kernels and "
                                     "fp8 need a CUDA GPU: run on the device machine")


def deviation(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) == STEPS, (len(a), len(b))
    return sum(abs(x - y) for x, y in zip(a, b)) / sum(abs(x) for x in a)


@pytest.fixture(scope="module")
def guard_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("guard") / "data"
    make_dataset(d, count=4, size=64, seed=3, repeats=2)
    return d


def curve(root: Path, model: Path, data: Path, *flags: str) -> list[float]:
    assert run(root, model, data, *BASE, *flags) == 0
    return read_scalars(root / "logs")["loss/current"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_sd15_dir, guard_data) -> list[float]:
    """The eager fp32 run on the device the tests run on."""
    return curve(tmp_path_factory.mktemp("ref"), tiny_sd15_dir, guard_data, *EAGER)


def record(name: str, dev: float, tol: float) -> None:
    """Append the measured deviation to $TOMLORA_GUARD_LOG (a JSON-lines file), if set."""
    log = os.environ.get("TOMLORA_GUARD_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"option": name, "deviation": round(dev, 6), "tolerance": tol,
                                "device": "cuda" if torch.cuda.is_available() else "cpu",
                                "steps": STEPS}) + "\n")
    print(f"{name}: deviation {dev:.5f} (tolerance {tol})")


def check(name, tol, tmp_path, tiny_sd15_dir, guard_data, reference, flags, ref_flags=None):
    """`ref_flags`: the reference needs flags of its own (then it is run here, eagerly)."""
    if ref_flags is not None:
        reference = curve(tmp_path / "ref", tiny_sd15_dir, guard_data, *ref_flags)
    dev = deviation(reference, curve(tmp_path / "opt", tiny_sd15_dir, guard_data, *flags))
    record(name, dev, tol)
    assert dev <= tol, f"{name}: the loss curve left the eager fp32 run by {dev:.4f} > {tol}"


def test_the_guard_sees_a_lora_that_does_not_learn(tmp_path, tiny_sd15_dir, guard_data,
                                                   reference):
    # learning_rate must be > 0; 1e-12 leaves the LoRA where it starts.
    frozen = curve(tmp_path, tiny_sd15_dir, guard_data, "--learning_rate", "1e-12")
    dev = deviation(reference, frozen)
    record("learning_rate 1e-12 (must be far off)", dev, 3 * APPROX_TOL)
    assert dev > 3 * APPROX_TOL, f"50 steps of training moved the curve by only {dev:.4f}"


CPU_OPTIONS = {
    "channels_last": (["--channels_last"], FP32_TOL),
    "batch_qkv_lora false": (["--batch_qkv_lora", "false"], FP32_TOL),
    # The reference caches latents (the default when valid): this is the VAE at every step.
    "cache_latents false": (["--cache_latents", "false"], SAMPLE_TOL),
    # Cached text-encoder outputs need a frozen text encoder (a third item: the reference's
    # own flags): against a UNet-only run that encodes every step (left unset, it would cache).
    "cache_text_encoder_outputs": (["--cache_text_encoder_outputs",
                                    "--network_train_unet_only"], FP32_TOL, UNET_ONLY_UNCACHED),
    "gradient_checkpointing": (["--gradient_checkpointing"], FP32_TOL),
    "AdamW8bit": (["--optimizer_type", "AdamW8bit", *EIGHT_BIT], APPROX_TOL),
    # No speed key: on CUDA the default fast path (graphs, cuDNN attention), on CPU eager.
    "default path": ([], FP32_TOL),
}


@pytest.mark.parametrize("name", list(CPU_OPTIONS))
def test_option_keeps_the_fp32_loss_curve(name, tmp_path, tiny_sd15_dir, guard_data, reference):
    flags, tol, *ref_flags = CPU_OPTIONS[name]
    check(name, tol, tmp_path, tiny_sd15_dir, guard_data, reference, flags,
          ref_flags[0] if ref_flags else None)


# One case per adapter algorithm: an option that only reorders arithmetic
# (gradient_checkpointing) against the same algorithm's eager fp32 run.
ALGOS = {
    "loha": ["--network_type", "loha", "--network_args", "conv_dim=2"],
    "lokr": ["--network_module", "lycoris.kohya", "--network_args", "algo=lokr", "factor=4",
             "preset=attn-mlp"],
    "dora": ["--network_args", "dora_wd=True"],
    "ia3": ["--network_module", "lycoris.kohya", "--network_args", "algo=ia3", "preset=ia3"],
    "full": ["--network_module", "lycoris.kohya", "--network_args", "algo=full",
             "preset=unet-transformer-only"],
    "locon tucker": ["--network_module", "lycoris.kohya", "--network_args", "algo=locon",
                     "use_tucker=True", "conv_dim=2", "preset=full"],
}


@pytest.mark.parametrize("algo", list(ALGOS))
def test_algorithm_keeps_the_fp32_loss_curve(algo, tmp_path, tiny_sd15_dir, guard_data,
                                             reference):
    flags = ALGOS[algo]
    check(f"{algo}: gradient_checkpointing", FP32_TOL, tmp_path, tiny_sd15_dir, guard_data,
          reference, [*flags, "--gradient_checkpointing"], flags)


BF16 = ["--mixed_precision", "bf16"]
GPU_OPTIONS = {
    "bf16 eager": (EAGER, BF16_TOL),
    # The default path with no speed key, and with what the seed configs add: gradient
    # checkpointing (recomputed inside the graphs) and accumulation (against an eager run
    # that accumulates too: another trajectory), fp16 with its loss scaler.
    "default path": ([], BF16_TOL),
    "default path + gradient_checkpointing": (["--gradient_checkpointing"], BF16_TOL),
    "default path + accumulation 2 + checkpointing, fp16":
        (["--gradient_accumulation_steps", "2", "--gradient_checkpointing",
          "--mixed_precision", "fp16"], BF16_TOL, ["--gradient_accumulation_steps", "2", *EAGER]),
    # The quality options on the default path: EMA leaves the training weights (and so the
    # loss) as they are; preservation adds its term to both runs.
    "default path + ema_decay": (["--ema_decay", "0.99"], BF16_TOL),
    "default path + preservation_weight":
        (["--preservation_weight", "1.0"], BF16_TOL, ["--preservation_weight", "1.0", *EAGER]),
    "cuda_graphs": (["--cuda_graphs"], BF16_TOL),
    "compile": (["--compile"], BF16_TOL),
    "compile reduce-overhead": (["--compile", "--compile_mode", "reduce-overhead"], BF16_TOL),
    "channels_last": (["--channels_last"], BF16_TOL),
    "batch_qkv_lora false": (["--batch_qkv_lora", "false"], BF16_TOL),
    "pin_memory": (["--pin_memory", "true"], BF16_TOL),
    "batch_qkv_lora false + cuda_graphs + compile": (["--batch_qkv_lora", "false",
                                                      "--cuda_graphs", "--compile"], BF16_TOL),
    "sdpa_backend cudnn": (["--sdpa_backend", "cudnn"], BF16_TOL),
    "sdpa_backend flash": (["--sdpa_backend", "flash"], BF16_TOL),
    "sdpa_backend efficient": (["--sdpa_backend", "efficient"], BF16_TOL),
    "AdamW unfused (foreach)": (["--optimizer_args", "foreach=True"], BF16_TOL),
    "gradient_checkpointing": (["--gradient_checkpointing"], BF16_TOL),
    "AdamW8bit": (["--optimizer_type", "AdamW8bit", *EIGHT_BIT], APPROX_TOL),
    "PagedAdamW8bit": (["--optimizer_type", "PagedAdamW8bit", *EIGHT_BIT], APPROX_TOL),
    "fp8_base": (["--fp8_base"], APPROX_TOL),
    # The preset files themselves (they cache latents, as the reference now does too).
    "fast preset": (["--config_file", str(PRESETS / "fast.toml")], BF16_TOL),
    "fast_compile preset": (["--config_file", str(PRESETS / "fast_compile.toml")], BF16_TOL),
    "lowmem preset": (["--config_file", str(PRESETS / "lowmem.toml"), *EIGHT_BIT],
                      APPROX_TOL, UNET_ONLY_UNCACHED),  # it trains the UNet only
    "low-memory (checkpointing + fp8 + AdamW8bit)":
        (["--gradient_checkpointing", "--fp8_base", "--optimizer_type", "AdamW8bit",
          *EIGHT_BIT], APPROX_TOL),
}


@GPU_ONLY
@pytest.mark.parametrize("algo", list(ALGOS))
def test_gpu_algorithm_keeps_the_fp32_loss_curve(algo, tmp_path, tiny_sd15_dir, guard_data,
                                                 reference):
    """bf16 + CUDA graphs + compile (+ fp8 base weights) with each algorithm, against its own
    eager fp32 run."""
    flags = ALGOS[algo]
    check(f"{algo}: bf16 + cuda_graphs + compile + fp8_base", APPROX_TOL, tmp_path,
          tiny_sd15_dir, guard_data, reference,
          [*BF16, *flags, "--cuda_graphs", "--compile", "--fp8_base"], flags)


@GPU_ONLY
@pytest.mark.parametrize("name", list(GPU_OPTIONS))
def test_gpu_option_keeps_the_fp32_loss_curve(name, tmp_path, tiny_sd15_dir, guard_data,
                                              reference):
    flags, tol, *ref_flags = GPU_OPTIONS[name]  # a third item: the reference's own flags
    check(name, tol, tmp_path, tiny_sd15_dir, guard_data, reference, [*BF16, *flags],
          ref_flags[0] if ref_flags else None)
