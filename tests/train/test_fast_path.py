"""Fast by default (library/train/fast_path.py): the decision of which speed options a run
uses, as a pure function of the config, the dataset's batch shapes and the device; and, on
the GPU, that the default path trains as the eager step does (graphs with gradient
checkpointing, gradient accumulation and several bucket shapes)."""
from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from library.config import load_config
from library.train.fast_path import Device, batch_shapes, plan_speed
from tests.train.test_loop import run
from tests.train.test_speed import curve_and_weights

H100 = Device("cuda", (9, 0))
A100 = Device("cuda", (8, 0))
CPU = Device("cpu")
NO_DROPOUT = {"dropout": 0.0, "rank_dropout": 0.0, "module_dropout": 0.0}
SHAPES = {(1, 128, 128): 30}


def config(*args: str):
    return load_config(list(args), check_paths=False).config


def plan(*args: str, shapes=None, device=H100, dropouts=None):
    cfg = config(*args)
    return plan_speed(cfg.training, cfg.model, dropouts or NO_DROPOUT,
                      SHAPES if shapes is None else shapes, device)


def test_a_config_without_speed_keys_gets_the_fast_path_on_cuda():
    p = plan()
    assert p.cuda_graphs and p.graph_shapes == {(1, 128, 128)}
    assert p.sdpa_backend == "cudnn" and not p.checkpoint_in_graphs and p.warning is None
    assert p.line.startswith("speed: CUDA graphs of the UNet for 1 batch shape (1024x1024 b1)")
    assert "(cuda_graphs unset)" in p.line and "cuDNN attention first" in p.line
    assert "q/k/v LoRA downs batched" in p.line and "compile off" in p.line
    assert 'cuda_graphs = false, sdpa_backend = "torch", batch_qkv_lora = false' in p.line


def test_each_choice_is_turned_off_by_its_key():
    p = plan("--cuda_graphs", "false", "--sdpa_backend", "torch", "--batch_qkv_lora", "false")
    assert not p.cuda_graphs and p.sdpa_backend == "torch"
    assert "CUDA graphs off (cuda_graphs = false)" in p.line
    assert "SDPA: sdpa_backend = \"torch\"" in p.line and "(batch_qkv_lora = false)" in p.line


def test_cudnn_attention_first_only_from_compute_capability_9():
    p = plan(device=A100)
    assert p.cuda_graphs and p.sdpa_backend == "torch" and "needs compute capability 9.0" \
        in p.line
    assert plan("--xformers", device=A100).sdpa_backend == ""


def test_cpu_keeps_the_eager_path_and_an_explicit_request_warns():
    p = plan(device=CPU)
    assert not p.cuda_graphs and p.warning is None and p.sdpa_backend == "auto"
    assert p.line == "speed: CUDA graphs off (no CUDA GPU); SDPA (CPU kernel); q/k/v LoRA " \
                     "downs batched"
    assert "needs a CUDA GPU" in plan("--cuda_graphs", device=CPU).warning


def test_gradient_checkpointing_runs_inside_the_graphs_unless_lora_dropout():
    # not through the GPU loss guard yet: only an explicit cuda_graphs = true takes it
    p = plan("--gradient_checkpointing")
    assert not p.cuda_graphs and "gradient_checkpointing inside the graphs has not passed " \
        "the GPU loss guard yet" in p.line
    p = plan("--gradient_accumulation_steps", "2")
    assert not p.cuda_graphs and "gradient accumulation under the graphs has not passed" in p.line
    p = plan("--gradient_checkpointing", "--cuda_graphs")
    assert p.cuda_graphs and p.checkpoint_in_graphs
    assert "gradient checkpointing recomputed inside them" in p.line
    for key in ("dropout", "rank_dropout"):
        p = plan("--gradient_checkpointing", "--cuda_graphs",
                 dropouts={**NO_DROPOUT, key: 0.1})
        assert not p.cuda_graphs and "other dropout masks" in p.line
    # without checkpointing LoRA dropout draws its masks inside the graph, fresh each replay
    assert plan(dropouts={**NO_DROPOUT, "dropout": 0.1}).cuda_graphs


def test_fallbacks_name_their_reason_and_explicit_requests_warn():
    p = plan(dropouts={**NO_DROPOUT, "module_dropout": 0.1})
    assert not p.cuda_graphs and "module_dropout decides on the host" in p.line
    assert "not batched (module_dropout)" in p.line and p.warning is None
    p = plan("--cuda_graphs", dropouts={**NO_DROPOUT, "module_dropout": 0.1})
    assert p.warning.startswith("cuda_graphs = true is off for this run: module_dropout")
    for args, why in ((["--fp8_base"], "fp8_base is not verified"),
                      (["--compile", "--compile_mode", "reduce-overhead"], "records CUDA graphs")):
        p = plan(*args)
        assert not p.cuda_graphs and why in p.line
        assert plan("--cuda_graphs", *args).cuda_graphs  # asked for: tried


def test_more_shapes_than_the_cap_capture_the_most_frequent():
    shapes = {(4, 128, 128): 40, (4, 96, 160): 20, (2, 128, 128): 1, (4, 160, 96): 10}
    p = plan("--cuda_graph_shapes", "2", shapes=shapes)
    assert p.graph_shapes == {(4, 128, 128), (4, 96, 160)}
    assert "for the 2 most frequent of 4 batch shapes (1024x1024 b4, 1280x768 b4: 85 % of " \
           "the steps; cuda_graph_shapes = 2), the other 2 run eagerly" in p.line
    assert plan(shapes=shapes).graph_shapes == set(shapes)  # the default cap is 8


def test_batch_shapes_count_each_shard_and_the_partial_batches(tmp_path):
    # 5 landscape + 2 square items, batch 2: (2,2,1) landscape batches, (2) square
    buckets = [(768, 512)] * 5 + [(512, 512)] * 2
    ds = SimpleNamespace(buckets=buckets,
                         batches=lambda epoch: [[0, 1], [5, 6], [2, 3], [4]])
    assert batch_shapes(ds) == {(2, 64, 96): 2, (2, 64, 64): 1, (1, 64, 96): 1}
    # two processes: each takes one sample of a pair, the single sample goes to rank 1
    assert batch_shapes(ds, rank=1, world=2) == {(1, 64, 96): 3, (1, 64, 64): 1}


def test_cuda_graphs_unset_is_the_default_and_true_still_parses():
    assert config().training.cuda_graphs is None
    assert config("--cuda_graphs").training.cuda_graphs is True
    assert config().model.sdpa_backend == "auto"


def test_a_cpu_run_logs_its_speed_line(tmp_path, tiny_sd15_dir, buckets_data, caplog):
    with caplog.at_level("INFO", logger="tomlora"):
        assert run(tmp_path, tiny_sd15_dir, buckets_data, "--max_train_steps", "2",
                   "--enable_bucket", "--bucket_reso_steps", "64", "--resolution", "192") == 0
    assert "speed: CUDA graphs off (no CUDA GPU)" in caplog.text


@pytest.fixture
def buckets_data(tmp_path):
    """3 landscape and 3 square pictures: at batch 2 with buckets (192 px, steps of 64, the
    multiple SD1.5-shaped models need: 256x128 and 192x192), 4 batch shapes (a full and a
    partial batch of each bucket)."""
    from PIL import Image
    sub = tmp_path / "buckets" / "1_thing"
    sub.mkdir(parents=True)
    for i, size in enumerate([(128, 64)] * 3 + [(96, 96)] * 3):
        Image.new("RGB", size, (40 * i, 200 - 30 * i, 90)).save(sub / f"{i}.png")
        (sub / f"{i}.txt").write_text(f"thing, colour {i}")
    return sub.parent

GPU_ONLY = pytest.mark.skipif(not torch.cuda.is_available(),
                              reason="CUDA graphs need a CUDA GPU: run on the device machine")


@GPU_ONLY
@pytest.mark.parametrize("extra", [[], ["--gradient_checkpointing"],
                                   ["--gradient_accumulation_steps", "2"],
                                   ["--gradient_checkpointing", "--gradient_accumulation_steps",
                                    "2", "--mixed_precision", "fp16"]],
                         ids=["default", "checkpointing", "accumulation", "seed-like"])
def test_gpu_default_path_trains_as_eager(tmp_path, tiny_sd15_dir, buckets_data, extra,
                                          caplog):
    """No speed key: the default path (graphs, cuDNN attention first) against the eager step
    with the same settings. Two buckets with a full and a partial batch each: four captured
    shapes in one shared memory pool."""
    common = ["--mixed_precision", "bf16", "--max_train_steps", "6", "--train_batch_size", "2",
              "--enable_bucket", "--bucket_reso_steps", "64", "--resolution", "192", *extra]
    assert run(tmp_path / "eager", tiny_sd15_dir, buckets_data, *common, "--cuda_graphs", "false",
               "--sdpa_backend", "torch") == 0
    with caplog.at_level("INFO", logger="tomlora"):
        # checkpointing and accumulation under graphs are taken only when asked for
        assert run(tmp_path / "fast", tiny_sd15_dir, buckets_data, *common,
                   *(["--cuda_graphs"] if extra else [])) == 0
    assert "speed: CUDA graphs of the UNet for 4 batch shapes" in caplog.text
    (a, wa), (b, wb) = curve_and_weights(tmp_path / "eager"), curve_and_weights(tmp_path / "fast")
    assert len(a) == len(b) == 6
    assert b == pytest.approx(a, rel=2e-2)
    # bf16: accumulation under graphs sums in another order; on an H100 (2026-12-05) one
    # weight element of 2048 differed by 0.0057 with the loss curve within 2 %
    atol = 1e-2 if "--gradient_accumulation_steps" in extra else 5e-3
    for k in wa:
        torch.testing.assert_close(wb[k].float(), wa[k].float(), rtol=5e-2, atol=atol)


def test_run_level_graph_problems_name_preservation_multipliers_and_adapters():
    """A graph replays the multiplier and batch it was captured with: preservation's second
    prompt batch and a per-dataset network_multiplier are hard stops; a LyCORIS algorithm
    is only 'not verified' (an explicit cuda_graphs = true still takes it)."""
    from types import SimpleNamespace as NS
    from library.train.fast_path import run_graph_problems
    lora = NS(spec=NS(algo="lora", dora=False))
    lokr = NS(spec=NS(algo="lokr", dora=True))
    plain = NS(datasets=[NS(o=NS(network_multiplier=1.0))])
    assert run_graph_problems(NS(preservation_weight=0.0), [lora], plain) == ((), ())
    hard, soft = run_graph_problems(NS(preservation_weight=1.0), [lora, lokr],
                                    NS(datasets=[NS(o=NS(network_multiplier=1.0)),
                                                 NS(o=NS(network_multiplier=0.5))]))
    assert len(hard) == 2 and "preservation_weight" in hard[0] and "network_multiplier" in hard[1]
    assert soft == ("lokr+DoRA is not verified under CUDA graphs",)
