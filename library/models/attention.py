"""Attention kernels and storage precision of the frozen UNet.

- SDPA (torch scaled_dot_product_attention) by default: as fast as xformers on torch 2 and
  needs nothing extra.
- `xformers = true`: xformers' memory-efficient attention, when the package is installed
  (requirements-gpu.txt); checked before any model loads. It is CUDA-only: on a CPU run it
  falls back to SDPA with a warning, as `mixed_precision` falls back to fp32.
- `fp8_base = true` (library/models/fp8.py): the UNet's Linear/Conv2d weights are stored as
  float8_e4m3fn and upcast per layer to the training dtype (bf16 under
  `mixed_precision = "bf16"`) in each forward; norms, biases, conv_in and conv_out stay in the
  training dtype. The layers run through custom autograd functions that save only the fp8
  weight for the backward (which upcasts it again), so the UNet weights take half the memory
  of bf16 during training as well as at rest (as kohya's fp8_base). CUDA-only; on CPU it is
  skipped with a warning. It must run before the LoRA attaches: LoRA then wraps the fp8
  forward.
- `sdpa_backend`: which SDPA kernel PyTorch tries first on CUDA (`set_sdpa_backend`). torch's
  own order (`torch`) is flash, memory-efficient, math, with cuDNN last; `cudnn` moves cuDNN's
  fused attention first (faster on Hopper in docs/BENCHMARKS.md), and `auto`, the default,
  does so on compute capability 9.0 and newer. A shape the preferred kernel
  cannot run (e.g. a head size it does not support) falls back to the next in the order, so
  every choice trains the same model. The order is process state: each run sets it.
"""
from __future__ import annotations

import importlib.util
import logging

import torch

from library.models.errors import ModelLoadError
from library.models.fp8 import FP8, FP8_KEEP, _upcasting_forward, store_fp8  # noqa: F401

log = logging.getLogger("tomlora")


from torch.nn.attention import SDPBackend

SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
_TORCH_ORDER = [int(b) for b in torch._C._get_sdp_priority_order()]  # as torch starts


def resolve_sdpa_backend(name: str, device) -> str:
    """`auto` on CUDA: cuDNN's fused attention first on compute capability 9.0 and newer
    (Hopper; measured 5-11 % faster there, docs/BENCHMARKS.md), torch's own order elsewhere.
    Any other name is returned as it is."""
    if name != "auto":
        return name
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.get_device_capability(dev) >= (9, 0):
        return "cudnn"
    return "torch"


def set_sdpa_backend(name: str) -> str:
    """Put SDPA backend `name` first in torch's kernel order (`auto`, `torch`: torch's own
    order) and
    make sure it is enabled; the others stay enabled behind it as fallbacks. Returns a line
    for the log."""
    order = list(_TORCH_ORDER)
    if name not in ("auto", "torch"):
        first = int(SDPA_BACKENDS[name])
        order = [first] + [b for b in order if b != first]
        getattr(torch.backends.cuda, {"flash": "enable_flash_sdp", "cudnn": "enable_cudnn_sdp",
                                      "efficient": "enable_mem_efficient_sdp",
                                      "math": "enable_math_sdp"}[name])(True)
    torch._C._set_sdp_priority_order(order)
    return f"SDPA kernels tried in the order {', '.join(sdpa_order())}"


def sdpa_order() -> list[str]:
    names = {int(v): k for k, v in SDPA_BACKENDS.items()}
    return [names[int(b)] for b in torch._C._get_sdp_priority_order() if int(b) in names]


def check_xformers(model_cfg) -> None:
    """Pre-flight: `xformers = true` needs the package."""
    if model_cfg.xformers and importlib.util.find_spec("xformers") is None:
        raise ModelLoadError(
            "xformers: set to true, but the xformers package is not installed. Install it "
            "on the CUDA machine with `pip install -r requirements-gpu.txt` (or `pip install "
            "xformers` built for your torch version), or remove the key: PyTorch SDPA, the "
            "default, is about as fast on torch 2.")


def configure_attention_and_storage(c, model_cfg, device, weight_dtype: torch.dtype
                                    ) -> list[str]:
    """Apply `xformers` / `sdpa` / `fp8_base` to the loaded UNet (on `device` already).
    Returns what was set up, for the log."""
    on_gpu = torch.device(device).type == "cuda"
    done = []
    use_xformers = model_cfg.xformers
    if use_xformers:
        check_xformers(model_cfg)
        if on_gpu:
            c.unet.enable_xformers_memory_efficient_attention()
            done.append("xformers attention")
        else:
            log.warning("xformers = true needs a CUDA GPU; using PyTorch SDPA on CPU")
            use_xformers = False
    if not use_xformers and model_cfg.sdpa:
        from diffusers.models.attention_processor import AttnProcessor2_0
        c.unet.set_attn_processor(AttnProcessor2_0())
        done.append("SDPA attention")
        if on_gpu:
            done.append(set_sdpa_backend(resolve_sdpa_backend(model_cfg.sdpa_backend, device)))
        elif model_cfg.sdpa_backend not in ("auto", "torch"):
            log.warning(f"sdpa_backend = \"{model_cfg.sdpa_backend}\" applies to CUDA; "
                        "the CPU runs its own SDPA kernel")
    if model_cfg.fp8_base:
        if on_gpu:
            n = store_fp8(c.unet, weight_dtype)
            done.append(f"UNet weights of {n} layers in float8_e4m3fn, computed in "
                        f"{weight_dtype}")
        else:
            log.warning("fp8_base = true needs a CUDA GPU; the UNet keeps its "
                        f"{weight_dtype} weights on CPU")
    return done
