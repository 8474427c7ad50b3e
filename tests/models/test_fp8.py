"""fp8 storage of the frozen UNet through custom autograd functions (library/models/fp8.py):
the same outputs and input gradients as the plain upcasting path, with only the fp8 weight
saved for the backward. The GPU cases (`gpu` in their names) run on the device machine."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from library.models.attention import FP8, store_fp8 as attention_store_fp8
from library.models.fp8 import _upcasting_forward, store_fp8
from networks.lora import LoRANetwork
from networks.targets import RankSpec, find_targets

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="fp8_base memory and CUDA paths need a CUDA GPU: run "
                                       "on the device machine (docs/BENCHMARKS.md)")

LAYERS = {
    "linear-2d": (lambda: nn.Linear(16, 24), (6, 16)),
    "linear-3d": (lambda: nn.Linear(16, 24, bias=False), (2, 5, 16)),
    "conv3x3-pad1-stride2": (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1), (2, 6, 9, 9)),
    "conv1x1": (lambda: nn.Conv2d(6, 8, 1, bias=False), (2, 6, 5, 7)),
}
# (compute dtype, input dtype, CPU autocast dtype or None)
DTYPES = {"fp32": (torch.float32, torch.float32, None),
          "bf16": (torch.bfloat16, torch.bfloat16, None),
          "fp32-input-bf16-autocast": (torch.bfloat16, torch.float32, torch.bfloat16)}


def pair(kind: str, compute: torch.dtype):
    """The same layer twice, weights stored in fp8: our autograd function, the plain path."""
    make, shape = LAYERS[kind]
    torch.manual_seed(0)
    new = nn.Sequential(make()).to(compute).requires_grad_(False)
    old = copy.deepcopy(new)
    assert store_fp8(new, compute) == 1
    assert store_fp8(old, compute, upcast_in_backward=False) == 1
    assert new[0].weight.dtype == FP8 and torch.equal(new[0].weight.float(),
                                                      old[0].weight.float())
    return new, old, shape


def out_and_grad(layer, x, autocast_dtype, grad_seed=1):
    x = x.detach().requires_grad_(True)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16,
                        enabled=autocast_dtype is not None):
        out = layer(x)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.dtype)
    out.backward(g)
    return out.detach(), x.grad


@pytest.mark.parametrize("dtypes", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("kind", LAYERS)
def test_same_output_and_input_grad_as_the_upcast_path(kind, dtypes):
    compute, x_dtype, autocast_dtype = dtypes
    new, old, shape = pair(kind, compute)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(x_dtype)
    out_new, grad_new = out_and_grad(new, x, autocast_dtype)
    out_old, grad_old = out_and_grad(old, x, autocast_dtype)
    assert out_new.dtype == out_old.dtype == compute
    assert grad_new.dtype == grad_old.dtype == x_dtype and grad_new.shape == x.shape
    # the same ops on the same fp8-rounded weights: equal up to summation order (exact here)
    tol = {"rtol": 1e-6, "atol": 1e-7} if compute == torch.float32 else \
        {"rtol": 1e-3, "atol": 1e-5}
    torch.testing.assert_close(out_new, out_old, **tol)
    torch.testing.assert_close(grad_new, grad_old, **tol)
    assert new[0].weight.grad is None and new[0].weight.dtype == FP8


def saved_bytes(layer, x) -> int:
    """Bytes autograd saves for the backward of one forward through `layer`."""
    sizes = []

    def pack(t):
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x.detach().requires_grad_(True))
    return sum(sizes)


@pytest.mark.parametrize("kind", LAYERS)
def test_only_the_fp8_weight_is_saved_for_backward(kind):
    new, old, shape = pair(kind, torch.bfloat16)
    x = torch.randn(shape, dtype=torch.bfloat16)
    n = new[0].weight.numel()
    saved_new, saved_old = saved_bytes(new, x), saved_bytes(old, x)
    assert saved_new == n  # the fp8 weight, 1 byte a weight (it exists anyway)
    assert saved_old >= 2 * n  # the bf16 upcast copy (conv: and the input)
    assert saved_new < saved_old


def test_frozen_weights_are_required():
    new, _, shape = pair("linear-2d", torch.float32)
    new[0].weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="frozen"):
        new(torch.randn(shape))


def test_other_padding_modes_keep_the_plain_path():
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect").requires_grad_(False)
    ref = copy.deepcopy(conv)
    store_fp8(nn.Sequential(conv), torch.float32)
    ref.weight.data = ref.weight.data.to(FP8).float()
    x = torch.randn(1, 3, 6, 6, requires_grad=True)
    conv(x).sum().backward()
    x2 = x.detach().requires_grad_(True)
    ref(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_compiles_without_graph_breaks():
    """dynamo traces the functions, forward and backward, in one graph (regional compile,
    library/train/speed.py); aot_eager keeps the test fast, the GPU test runs inductor."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.conv = nn.Linear(8, 8), nn.Conv2d(4, 4, 3, 2, 1)

        def forward(self, x, img):
            return self.lin(x).square().sum() + self.conv(img).square().sum()

    torch.manual_seed(0)
    block = Block().requires_grad_(False)
    store_fp8(block, torch.float32)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x, img = torch.randn(2, 3, 8), torch.randn(1, 4, 7, 7)
    grads = []
    for fn in (block, compiled):
        xs = (x.clone().requires_grad_(True), img.clone().requires_grad_(True))
        fn(*xs).backward()
        grads.append([t.grad for t in xs])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def unet_with_lora(folder_components, upcast_in_backward: bool, checkpointing: bool = False):
    unet = copy.deepcopy(folder_components["sd15"].unet).float().requires_grad_(False)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    assert store_fp8(unet, torch.float32, upcast_in_backward=upcast_in_backward) > 50
    torch.manual_seed(3)
    net = LoRANetwork(find_targets(unet, [], (), "sd15", RankSpec(4, 4, conv_dim=4, conv_alpha=4),
                                   train_unet=True, train_text_encoder=False))
    for m in net:  # non-zero ups: the LoRA path and the grads of the downs count too
        nn.init.normal_(m.lora_up.weight, std=0.05)
    net.attach()
    return unet, net


def test_unet_lora_grads_match_the_upcast_path(folder_components):
    """Through the tiny SD1.5 UNet with LoRA on its Linear and Conv layers (attached after
    store_fp8, so wrapping the fp8 forward): one backward gives the LoRA the gradients of the
    plain path, with and without gradient checkpointing, and the UNet none."""
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    runs = {}
    for key, upcast, ckpt in (("new", True, False), ("old", False, False),
                              ("new+checkpointing", True, True)):
        unet, net = unet_with_lora(folder_components, upcast, ckpt)
        assert any(isinstance(m.base, nn.Conv2d) for m in net)
        out = unet(x, 10, ctx).sample
        out.square().mean().backward()
        assert all(p.grad is None for p in unet.parameters())
        runs[key] = (out.detach(), {n: p.grad for n, p in net.named_parameters()})
        net.detach()
    out_old, grads_old = runs.pop("old")
    assert all(v.abs().sum() > 0 for v in grads_old.values())
    for out, grads in runs.values():
        torch.testing.assert_close(out, out_old, rtol=1e-5, atol=1e-6)
        assert grads.keys() == grads_old.keys()
        for n in grads:
            torch.testing.assert_close(grads[n], grads_old[n], rtol=1e-4, atol=1e-12)


def test_attention_module_keeps_its_names():
    from library.models import attention
    assert attention_store_fp8 is store_fp8 and attention._upcasting_forward is \
        _upcasting_forward and attention.FP8_KEEP == ("conv_in", "conv_out")


# ---- GPU (device machine) ------------------------------------------------------------------

def peak_of_fwd_bwd(model, x) -> int:
    """Peak bytes allocated above the resting state during one forward+backward."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    x = x.detach().requires_grad_(True)
    model(x).float().square().mean().backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@needs_cuda
def test_gpu_fp8_function_lowers_peak_memory():
    """8 stacked 4096x4096 fp8 Linears in bf16: the plain path keeps the 8 bf16 upcast
    copies (32 MiB each) until the backward, the autograd function at most a transient one."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        new = nn.Sequential(*[nn.Linear(4096, 4096) for _ in range(8)])
    new.to(torch.bfloat16).requires_grad_(False)
    old = copy.deepcopy(new)
    store_fp8(new, torch.bfloat16)
    store_fp8(old, torch.bfloat16, upcast_in_backward=False)
    x = torch.randn(256, 4096, device="cuda", dtype=torch.bfloat16)
    peak_old, peak_new = peak_of_fwd_bwd(old, x), peak_of_fwd_bwd(new, x)
    bf16_copy = 4096 * 4096 * 2
    assert peak_new < peak_old, (peak_new, peak_old)
    assert peak_old - peak_new >= 4 * bf16_copy, (peak_new / 2**20, peak_old / 2**20)


@needs_cuda
def test_gpu_fp8_function_under_compile_and_cuda_graphs():
    """The same input gradients eagerly, through inductor and replayed from a CUDA graph
    (bf16 autocast, fp32 inputs, as the trainer runs)."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.conv = nn.Linear(64, 64), nn.Conv2d(8, 8, 3, 2, 1)

        def forward(self, x, img):
            # no autocast weight cache inside CUDA graphs (torch's rule, library/train/speed.py)
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                return self.lin(x).float().square().sum() + self.conv(img).float().square().sum()

    torch.manual_seed(0)
    block = Block().cuda().to(torch.bfloat16).requires_grad_(False)
    store_fp8(block, torch.bfloat16)
    x, img = torch.randn(4, 16, 64, device="cuda"), torch.randn(2, 8, 16, 16, device="cuda")

    def grads(fn):
        xs = (x.clone().requires_grad_(True), img.clone().requires_grad_(True))
        fn(*xs).backward()
        return [t.grad for t in xs]

    eager = grads(block)
    compiled = grads(torch.compile(block, fullgraph=True))
    graphed_fn = torch.cuda.make_graphed_callables(
        block, (x.clone().requires_grad_(True), img.clone().requires_grad_(True)))
    graphed = grads(graphed_fn)
    for other in (compiled, graphed):
        for a, b in zip(eager, other):
            torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-2)


@needs_cuda
@pytest.mark.parametrize("flags", [[], ["--gradient_checkpointing"], ["--cuda_graphs"],
                                   ["--compile"]],
                         ids=["eager", "checkpointing", "graphs", "compile"])
def test_gpu_fp8_base_trains(tmp_path, tiny_sd15_dir, flags, caplog):
    """fp8_base through train_network.main on the tiny model, bf16, 3 steps."""
    import math

    from tests.test_train_e2e import read_scalars
    from tests.train.test_loop import run
    from tools.make_demo_dataset import make_dataset
    data = tmp_path / "data"
    make_dataset(data, count=4, size=64, seed=3, repeats=2)
    with caplog.at_level("INFO", logger="tomlora"):
        assert run(tmp_path, tiny_sd15_dir, data, "--mixed_precision", "bf16", "--fp8_base",
                   "--max_train_steps", "3", *flags) == 0
    assert "float8_e4m3fn" in caplog.text
    losses = read_scalars(tmp_path / "logs")["loss/current"]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
