"""Speed toggles (library/train/speed.py) keep the training trajectory: `compile = true`
(regional torch.compile through inductor, here its CPU backend) and `channels_last` give the
same loss curve and LoRA as the eager run, through the real CLI on the tiny model. Their
speed is measured on the GPU in bench/bench_step.py, never here."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from library.config import ConfigError, load_config
from library.train.speed import compile_blocks
from tests.test_train_e2e import read_scalars
from tests.train.test_loop import data, run  # noqa: F401  (the fixture)


def curve_and_weights(root):
    return (read_scalars(root / "logs")["loss/current"],
            load_file(str(root / "out" / "t.safetensors")))


@pytest.mark.parametrize("flags", [["--compile"], ["--channels_last"],
                                   ["--batch_qkv_lora", "false"]],
                         ids=["compile", "channels_last", "batch_qkv_lora_off"])
def test_toggle_keeps_the_loss_curve(tmp_path, tiny_sd15_dir, data, flags):  # noqa: F811
    assert run(tmp_path / "eager", tiny_sd15_dir, data, "--max_train_steps", "3") == 0
    assert run(tmp_path / "fast", tiny_sd15_dir, data, "--max_train_steps", "3", *flags) == 0
    (a, wa), (b, wb) = curve_and_weights(tmp_path / "eager"), curve_and_weights(tmp_path / "fast")
    assert len(a) == len(b) == 3
    assert b == pytest.approx(a, rel=1e-4)
    # On a CUDA machine these fp32 runs use cuDNN's TF32 convolutions (torch's default),
    # whose rounding depends on the kernel and layout: single elements move by ~3e-5 there.
    # On a CPU the kernels' summation order depends on the instruction set: single elements
    # of 2048 moved 1.4e-5 and 1.7e-5 on an AMD EPYC. Three Adam steps at 1e-3 move a weight
    # by up to 3e-3, so 5e-5 still catches a toggle that changes the arithmetic.
    atol = 1e-4 if torch.cuda.is_available() else 5e-5
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=atol)


def test_compile_mode_is_checked(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(["--compile_mode", "fastest"], check_paths=False)
    assert "compile_mode" in str(e.value) and "reduce-overhead" in str(e.value)


def test_compile_blocks_needs_blocks():
    with pytest.raises(ValueError, match="no transformer or ResNet blocks"):
        compile_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_cuda_graphs_fall_back_on_cpu_with_a_reason():
    from types import SimpleNamespace

    from library.train.speed import training_unet
    unet, net = torch.nn.Linear(2, 2), torch.nn.ModuleList()
    cfg = SimpleNamespace(cuda_graphs=True, gradient_checkpointing=False)
    call, note = training_unet(unet, net, cfg, "cpu")
    assert call is unet and "needs a CUDA GPU" in note
    assert training_unet(unet, net, SimpleNamespace(cuda_graphs=False), "cpu") == (unet, None)


def test_sdpa_backend_sets_the_kernel_order_and_auto_restores_it():
    from library.models.attention import set_sdpa_backend, sdpa_order
    torch_order = sdpa_order()
    try:
        assert "cudnn, flash" in set_sdpa_backend("cudnn")
        assert sdpa_order()[0] == "cudnn" and sorted(sdpa_order()) == sorted(torch_order)
        set_sdpa_backend("efficient")
        assert sdpa_order()[0] == "efficient"
    finally:
        set_sdpa_backend("auto")
    assert sdpa_order() == torch_order


def test_sdpa_backend_needs_sdpa(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(["--sdpa_backend", "cudnn", "--xformers"], check_paths=False)
    assert "sdpa_backend" in str(e.value) and "xformers = true" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(["--sdpa_backend", "flashest"], check_paths=False)
    assert "cudnn" in str(e.value)


def test_sdpa_backend_on_cpu_warns_and_trains(tmp_path, tiny_sd15_dir, data, caplog):  # noqa: F811
    with caplog.at_level("WARNING", logger="tomlora"):
        assert run(tmp_path, tiny_sd15_dir, data, "--max_train_steps", "1",
                   "--sdpa_backend", "cudnn") == 0
    assert 'sdpa_backend = "cudnn" applies to CUDA' in caplog.text


GPU_ONLY = pytest.mark.skipif(not torch.cuda.is_available(),
                              reason="CUDA graphs, GPU compile and SDPA kernel choice need a "
                                     "CUDA GPU: run on the device machine (docs/BENCHMARKS.md)")


@GPU_ONLY
@pytest.mark.parametrize("backend", ["cudnn", "flash", "efficient"])
def test_gpu_sdpa_backend_runs_that_kernel(backend):
    """The preferred kernel really runs (seen in the profiler), forward and backward, and
    gives the result of the math kernel."""
    from torch.profiler import ProfilerActivity, profile

    from library.models.attention import set_sdpa_backend
    q, k, v = (torch.randn(2, 8, 1024, 64, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    want = {"cudnn": "cudnn", "flash": "flash", "efficient": "fmha"}[backend]
    try:
        set_sdpa_backend(backend)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            out.float().square().sum().backward()
            torch.cuda.synchronize()
    finally:
        set_sdpa_backend("auto")
    names = " ".join(e.name.lower() for e in prof.events())
    assert want in names, names[:2000]
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


@GPU_ONLY
@pytest.mark.parametrize("flags", [["--cuda_graphs"], ["--cuda_graphs", "--compile"],
                                   ["--compile", "--compile_mode", "reduce-overhead"],
                                   ["--cuda_graphs", "--compile", "--sdpa_backend", "cudnn"],
                                   ["--cuda_graphs", "--compile", "--batch_qkv_lora", "false"]],
                         ids=["graphs", "graphs+compile", "compile-cudagraphs",
                              "graphs+compile+cudnn", "graphs+compile-qkv"])
def test_gpu_toggle_keeps_the_loss_curve(tmp_path, tiny_sd15_dir, data, flags,  # noqa: F811
                                         caplog):
    bf16 = ["--mixed_precision", "bf16", "--max_train_steps", "4"]
    assert run(tmp_path / "eager", tiny_sd15_dir, data, *bf16, "--cuda_graphs", "false",
               "--sdpa_backend", "torch") == 0  # on CUDA the default is the fast path
    with caplog.at_level("INFO", logger="tomlora"):
        assert run(tmp_path / "fast", tiny_sd15_dir, data, *bf16, *flags) == 0
    if "--cuda_graphs" in flags:
        assert "CUDA graphs of the UNet" in caplog.text
    if "--sdpa_backend" in flags:
        assert "SDPA kernels tried in the order cudnn" in caplog.text
    assert ("batched LoRA down projections: q/k/v of" in caplog.text) == \
        ("--batch_qkv_lora" not in flags)
    (a, wa), (b, wb) = curve_and_weights(tmp_path / "eager"), curve_and_weights(tmp_path / "fast")
    assert len(a) == len(b) == 4
    assert b == pytest.approx(a, rel=2e-2)
    for k in wa:
        torch.testing.assert_close(wb[k].float(), wa[k].float(), rtol=5e-2, atol=5e-3)


def test_batch_to_device_keeps_host_keys_and_cpu_batches_as_they_are():
    from library.train.step import batch_to_device
    batch = {"latents": torch.randn(2, 4, 8, 8), "sample_seed": torch.tensor([1, 2]),
             "captions": ["a", "b"]}
    out = batch_to_device(batch, "cpu")
    assert out.keys() == batch.keys()
    assert all(out[k] is batch[k] for k in batch)  # already there: no copies


@GPU_ONLY
@pytest.mark.parametrize("pin", [True, False], ids=["pinned", "pageable"])
def test_gpu_batch_to_device_copies_every_tensor_but_the_seeds(pin):
    from library.train.step import batch_to_device
    batch = {"latents": torch.randn(4, 4, 128, 128), "loss_weight": torch.ones(4),
             "original_size": torch.tensor([[1024, 1024]] * 4),
             "sample_seed": torch.tensor([1, 2, 3, 4]), "captions": ["a"] * 4}
    out = batch_to_device(batch, "cuda", pin_memory=pin)
    torch.cuda.synchronize()
    for k in ("latents", "loss_weight", "original_size"):
        assert out[k].is_cuda
        assert torch.equal(out[k].cpu(), batch[k])
    assert out["sample_seed"].device.type == "cpu" and out["captions"] == batch["captions"]
