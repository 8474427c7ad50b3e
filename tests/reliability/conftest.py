"""Shared pieces of the fault-injection suite: a tiny run (32 px, 2 images, UNet-only LoRA
with cached text-encoder outputs, a few steps) run in-process or as a subprocess, and one
uninterrupted baseline per module that interrupted-and-resumed runs must match bit for bit.

Save points (library/durable.py, `TOMLORA_FAULT`) of `tiny_args(out, 3)` with
`SAVE_EVERY_STEP`, in order: 1 the resolved config; per step save, the LoRA file (2, 9),
the state's lora / training.safetensors / training.json / state.json / manifest.json
(3-7, 10-14) and the state folder's rename (8, 15); the final LoRA (16), its state's files
(17-21) and rename (22).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import library.durable
import train_network
from tools.make_demo_dataset import make_dataset

ROOT = Path(__file__).resolve().parents[2]
SAVE_EVERY_STEP = ("--save_every_n_steps", "1", "--save_state")
TOTAL_SAVE_POINTS = 22


@pytest.fixture(scope="session")
def rel_data(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("reldata") / "data"
    make_dataset(d, count=2, size=32, seed=3, repeats=1)
    return d


@pytest.fixture(scope="session")
def tiny_args(tiny_sd15_dir, rel_data):
    def args(out: Path, steps: int = 3, *extra: str) -> list[str]:
        return ["--pretrained_model_name_or_path", str(tiny_sd15_dir),
                "--train_data_dir", str(rel_data), "--resolution", "32",
                "--train_batch_size", "1", "--network_dim", "2", "--learning_rate", "1e-3",
                "--network_train_unet_only", "--cache_text_encoder_outputs",
                "--seed", "7", "--save_precision", "float", "--max_train_steps", str(steps),
                "--output_dir", str(out), "--output_name", "t",
                "--logging_dir", str(out.parent / f"{out.name}-logs"), *extra]
    return args


def run_inproc(args: list[str], **env: str) -> int:
    """train_network.main in this process, with fault hooks from `env` (counting afresh)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    library.durable._points = 0
    try:
        return train_network.main(args)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def popen(args: list[str], **env: str) -> subprocess.Popen:
    """train_network.py as a user runs it, in a subprocess."""
    return subprocess.Popen([sys.executable, str(ROOT / "train_network.py"), *args], cwd=ROOT,
                            env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(flag: Path, p: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until the subprocess paused by the TOMLORA_TEST_STEP_FILE hook wrote `flag`."""
    import time
    deadline = time.time() + timeout
    while not flag.exists():
        if p.poll() is not None or time.time() > deadline:
            p.kill()
            raise AssertionError(f"the run ended before the step hook: {p.communicate()[1]}")
        time.sleep(0.05)


def run_cli(args: list[str], timeout: float = 300, **env: str) -> tuple[int, str]:
    p = popen(args, **env)
    _, err = p.communicate(timeout=timeout)
    return p.returncode, err


def tensors_equal(a: Path, b: Path) -> bool:
    """Bitwise equality of the tensors of two .safetensors files (metadata holds dates)."""
    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(
        ta[k].dtype == tb[k].dtype and torch.equal(ta[k].reshape(-1).view(torch.uint8),
                                                   tb[k].reshape(-1).view(torch.uint8))
        for k in ta)


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob("*") if library.durable.is_leftover(p.name))


@pytest.fixture(scope="session")
def baseline(tmp_path_factory, tiny_args) -> Path:
    """An uninterrupted 3-step run saving every step (LoRA and state): its output_dir."""
    out = tmp_path_factory.mktemp("baseline") / "out"
    assert run_inproc(tiny_args(out, 3, *SAVE_EVERY_STEP)) == 0
    return out
