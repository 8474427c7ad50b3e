"""The pieces under the fault-injection suite, without training: the pickle-free state codec,
state folders with extra tensors, durable writes and their leftovers, the output_dir lock."""
from __future__ import annotations

import math
import os
import random
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from library import durable
from library.train.run_lock import LOCK_NAME, LockError, RunLock
from library.train.state import Position, StateError, latest_state, load_state, \
    read_extra_tensors, save_state
from library.train.state_codec import decode, encode
from networks.lora import LoRANetwork, Target


def test_codec_round_trips_state_dicts_exactly():
    obj = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
           "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0, 1],
                             "foreach": None, "maximize": False, "eps": float("inf")}],
           "python": random.getstate(), "numpy": np.random.get_state(),
           "bf16": torch.randn(4).bfloat16(), "dtype": torch.float16, "__odd": 1}
    data, tensors = encode(obj)
    back = decode(data, tensors)
    assert back["state"][0]["step"].item() == 3.0 and isinstance(back["state"], dict)
    assert torch.equal(back["state"][0]["exp_avg"], obj["state"][0]["exp_avg"])
    assert back["param_groups"] == obj["param_groups"]
    assert back["python"] == obj["python"]
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
               for a, b in zip(back["numpy"], obj["numpy"]))
    assert torch.equal(back["bf16"], obj["bf16"]) and back["dtype"] is torch.float16
    assert back["__odd"] == 1 and math.isinf(back["param_groups"][0]["eps"])
    shared = torch.arange(6.0)
    data, tensors = encode({"a": shared, "b": shared, "view": shared[2:4]})
    back = decode(data, tensors)
    assert len(tensors) == 2 and back["a"] is back["b"] and back["view"].tolist() == [2, 3]
    with pytest.raises(TypeError, match="object cannot be stored"):
        encode({"x": object()})


def _run_objects(seed=0):
    torch.manual_seed(seed)
    net = LoRANetwork([Target("lora_unet_a", nn.Linear(8, 6), 2, 1.0)])
    for p in net.parameters():
        nn.init.normal_(p)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1))
    return net, opt, sched


def test_state_folder_round_trip_with_extra_tensors(tmp_path):
    net, opt, sched = _run_objects()
    for _ in range(2):
        sum((p ** 2).sum() for p in net.parameters()).backward()
        opt.step(), sched.step(), opt.zero_grad()
    ema = {"ema.lora_unet_a.down": torch.randn(2, 8), "ema.decay": torch.tensor(0.999)}
    gen = torch.Generator().manual_seed(5)
    folder = save_state(tmp_path / "s", network=net, optimizer=opt, lr_scheduler=sched,
                        scaler=None, position=Position(2, 0, 2, 7), fingerprint="f",
                        generators={"g": gen}, extra_tensors=ema)
    assert sorted(p.name for p in folder.iterdir()) == [
        "extra.safetensors", "lora.safetensors", "manifest.json", "state.json",
        "training.json", "training.safetensors"]
    expect_rand = torch.rand(3)
    expect_gen = torch.rand(3, generator=gen)
    net2, opt2, sched2 = _run_objects(seed=1)
    ema2 = {k: torch.zeros_like(v) for k, v in ema.items()}
    gen2 = torch.Generator()
    pos = load_state(folder, network=net2, optimizer=opt2, lr_scheduler=sched2, scaler=None,
                     generators={"g": gen2}, extra_tensors=ema2)
    assert pos == Position(2, 0, 2, 7)
    assert all(torch.equal(ema[k], ema2[k]) for k in ema)
    assert read_extra_tensors(folder).keys() == ema.keys()
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), net2.parameters()))
    assert sched2.state_dict() == sched.state_dict()
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i][k], s2[i][k]) for i in s1 for k in s1[i])
    assert torch.equal(torch.rand(3), expect_rand)  # RNG restored
    assert torch.equal(torch.rand(3, generator=gen2), expect_gen)
    with pytest.raises(StateError, match="no saved tensor 'other'"):
        load_state(folder, network=net2, optimizer=opt2, lr_scheduler=sched2, scaler=None,
                   extra_tensors={"other": torch.zeros(1)})


def test_atomic_write_under_a_full_disk_leaves_the_old_file_and_no_temporary(tmp_path,
                                                                             monkeypatch):
    path = tmp_path / "x.safetensors"
    durable.atomic_write_bytes(path, b"old")
    monkeypatch.setenv("TOMLORA_FAULT", "enospc@1")
    monkeypatch.setattr(durable, "_points", 0)
    with pytest.raises(OSError, match="No space left on device") as e:
        durable.atomic_write_bytes(path, b"new")
    assert e.value.filename == str(path)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["x.safetensors"]


def test_leftovers_are_removed_and_a_state_caught_mid_swap_is_put_back(tmp_path):
    (tmp_path / ".tomlora-tmp-t.safetensors-123").write_bytes(b"half")
    (tmp_path / ".tomlora-tmp-t-step00000002-state-123").mkdir()
    (tmp_path / ".t.safetensors.tmp-99").write_bytes(b"")        # older versions' names
    (tmp_path / "t-step00000003-state.tmp").mkdir()
    moved = tmp_path / ".tomlora-tmp-t-state-old-123"             # killed between renames
    moved.mkdir()
    (moved / "state.json").write_text("{}")
    (tmp_path / "sample").mkdir()
    (tmp_path / "sample" / ".tomlora-tmp-a.png-5").write_bytes(b"")
    keep = ["t-step00000001.safetensors", "t-step00000001-state", LOCK_NAME, "t.toml"]
    for k in keep:
        (tmp_path / k).write_text("x")
    removed = durable.remove_leftovers(tmp_path)
    assert ".tomlora-tmp-t-state-old-123 (restored as t-state)" in removed
    assert len(removed) == 6
    assert sorted(os.listdir(tmp_path)) == sorted(keep + ["sample", "t-state"])
    assert (tmp_path / "t-state" / "state.json").is_file()
    assert os.listdir(tmp_path / "sample") == []


def test_lock_refuses_a_live_run_and_takes_over_a_stale_one(tmp_path):
    lock = RunLock(tmp_path / "out").acquire()
    assert (tmp_path / "out" / LOCK_NAME).is_file()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "out" / LOCK_NAME).write_text(
            f'{{"pid": {live.pid}, "host": "{socket.gethostname()}", "started": "now"}}')
        with pytest.raises(LockError, match=f"in use by another run \\(PID {live.pid} on "):
            RunLock(tmp_path / "out").acquire()
    finally:
        live.kill()
        live.wait()
    stale = RunLock(tmp_path / "out").acquire()  # the PID is gone now
    assert f"took over a stale lock of a run that is no longer running (PID {live.pid}" in \
        stale.note
    (tmp_path / "out" / LOCK_NAME).write_text('{"pid": 1, "host": "elsewhere", "started": 0}')
    with pytest.raises(LockError, match="locked by a run on host elsewhere"):
        RunLock(tmp_path / "out").acquire()
    lock.held = False
    fresh = RunLock(tmp_path / "new").acquire()
    fresh.release()
    assert not (tmp_path / "new").exists()  # a run that wrote nothing leaves no folder


def test_resume_latest_takes_the_newest_complete_state(tmp_path):
    net, opt, sched = _run_objects()
    for step in (1, 2, 3):
        save_state(tmp_path / f"t-step{step:08d}-state", network=net, optimizer=opt,
                   lr_scheduler=sched, scaler=None, position=Position(step, 0, step, 7),
                   fingerprint="f")
    save_state(tmp_path / "other-step00000009-state", network=net, optimizer=opt,
               lr_scheduler=sched, scaler=None, position=Position(9, 0, 0, 7), fingerprint="f")
    (tmp_path / "t-step00000003-state" / "training.json").write_text("{}")  # damaged
    found, notes = latest_state(tmp_path, "t")
    assert found == tmp_path / "t-step00000002-state"
    assert len(notes) == 1 and notes[0].startswith("skipped t-step00000003-state: ")
    assert latest_state(tmp_path / "none", "t") == (None, [])


def test_only_the_main_process_of_a_launch_locks_the_folder(tmp_path, monkeypatch):
    """accelerate launch starts one process per GPU for the same run: rank 0 locks (and
    tidies) output_dir, the others must not find it 'in use by another run'."""
    from contextlib import ExitStack
    from library.train.run_lock import claim_output_dir
    out = tmp_path / "out"
    with ExitStack() as main_rank:
        monkeypatch.setenv("RANK", "0")
        claim_output_dir(out, main_rank)
        assert (out / LOCK_NAME).is_file()
        monkeypatch.setenv("RANK", "1")
        with ExitStack() as other_rank:
            assert claim_output_dir(out, other_rank) == []
        assert (out / LOCK_NAME).is_file()  # still rank 0's
