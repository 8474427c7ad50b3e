"""Attention kernels and fp8 storage of the frozen UNet (library/models/attention.py)."""
from __future__ import annotations

import copy
import importlib.util
import logging

import pytest
import torch

from library.config.schema import ModelConfig
from library.models.attention import FP8, check_xformers, configure_attention_and_storage, \
    store_fp8
from library.models.errors import ModelLoadError
from networks.lora import LoRAModule

HAS_XFORMERS = importlib.util.find_spec("xformers") is not None


def unet_copy(folder_components, family="sd15"):
    c = copy.copy(folder_components[family])
    c.unet = copy.deepcopy(c.unet)
    return c


@pytest.mark.skipif(HAS_XFORMERS, reason="xformers is installed here")
def test_xformers_missing_says_how_to_install():
    with pytest.raises(ModelLoadError) as e:
        check_xformers(ModelConfig(xformers=True))
    assert "pip install -r requirements-gpu.txt" in str(e.value)
    check_xformers(ModelConfig())  # off: nothing to check


def test_sdpa_is_the_default(folder_components):
    from diffusers.models.attention_processor import AttnProcessor2_0
    c = unet_copy(folder_components)
    notes = configure_attention_and_storage(c, ModelConfig(), "cpu", torch.float32)
    assert notes == ["SDPA attention"]
    assert all(isinstance(p, AttnProcessor2_0) for p in c.unet.attn_processors.values())


def test_fp8_base_on_cpu_is_skipped_with_a_warning(folder_components, caplog):
    c = unet_copy(folder_components)
    with caplog.at_level(logging.WARNING, logger="tomlora"):
        notes = configure_attention_and_storage(c, ModelConfig(fp8_base=True), "cpu",
                                                torch.float32)
    assert "fp8_base = true needs a CUDA GPU" in caplog.text
    assert not any("float8" in n for n in notes)
    assert all(p.dtype == torch.float32 for p in c.unet.parameters())


def test_fp8_storage_computes_in_bf16_and_trains_a_lora(folder_components):
    """The path fp8_base takes on GPU, run on CPU: Linear/Conv weights stored as
    float8_e4m3fn and upcast per layer; a LoRA attached afterwards wraps the fp8 forward, and
    backward works (the fp8 autograd functions upcast the stored weights again;
    tests/models/test_fp8.py compares them with the plain upcast path)."""
    c = unet_copy(folder_components)
    unet = c.unet.to(torch.bfloat16)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).bfloat16()
    ctx = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.no_grad():
        ref = unet(x, 10, ctx).sample.float()
    assert store_fp8(unet, torch.bfloat16) > 50
    q = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert q.weight.dtype == FP8
    assert unet.conv_in.weight.dtype == torch.bfloat16 and unet.dtype == torch.bfloat16
    lora = LoRAModule("q", q, rank=2)
    lora.attach()
    out = unet(x, 10, ctx).sample.float()
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    assert lora.lora_up.weight.grad is not None and lora.lora_up.weight.grad.abs().sum() > 0
    assert q.weight.dtype == FP8 and q.weight.grad is None
    # fp8 rounding only (e4m3 keeps 3 mantissa bits); the zero-init LoRA adds nothing
    assert (out.detach() - ref).abs().mean() < 0.1 * ref.abs().mean()
    lora.detach()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp8_base / xformers need CUDA")
def test_on_gpu(folder_components):
    c = unet_copy(folder_components)
    c.unet.to("cuda", torch.bfloat16)
    notes = configure_attention_and_storage(c, ModelConfig(fp8_base=True), "cuda",
                                            torch.bfloat16)
    assert any("float8" in n for n in notes)
    q = c.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert q.weight.dtype == FP8
    lora = LoRAModule("q", q, rank=2).to("cuda")
    lora.attach()
    x = torch.randn(1, 4, 8, 8, device="cuda")
    ctx = torch.randn(1, 77, 32, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):  # as accelerate trains in bf16
        out = c.unet(x, 10, ctx).sample
    out.float().square().mean().backward()
    assert torch.isfinite(out).all() and lora.lora_up.weight.grad.abs().sum() > 0
    lora.detach()
