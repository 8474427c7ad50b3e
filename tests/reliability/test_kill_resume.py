"""SIGKILL at save points, then `resume = "latest"` in the same output_dir: every file left
is whole, the leftovers are removed (and said so), the stale lock is taken over, and the
resumed run ends with LoRAs bitwise equal to the uninterrupted baseline.

By default two save points that leave temporary files behind are tried (the step-2 LoRA
before its rename, the middle of the step-2 state). TOMLORA_RELIABILITY_FULL=1 tries every
save point (a list such as TOMLORA_RELIABILITY_FULL=2,8,22 tries those);
TOMLORA_RELIABILITY_RANDOM=N adds N random save points and N kills at a random step boundary
(a subprocess paused by the TOMLORA_TEST_STEP_FILE hook)."""
from __future__ import annotations

import logging
import os
import random
import signal
import time

import pytest
from safetensors.torch import load_file

from library.durable import is_leftover
from library.train.state import read_position
from tests.reliability.conftest import SAVE_EVERY_STEP, TOTAL_SAVE_POINTS, leftovers, \
    popen, run_cli, run_inproc, tensors_equal, wait_for

FULL = os.environ.get("TOMLORA_RELIABILITY_FULL", "")
POINTS = [int(n) for n in FULL.split(",")] if FULL not in ("", "1") else \
    list(range(1, TOTAL_SAVE_POINTS + 1)) if FULL == "1" else [9, 12]
RANDOM = int(os.environ.get("TOMLORA_RELIABILITY_RANDOM", "0"))
_rng = random.Random(os.environ.get("TOMLORA_RELIABILITY_SEED", str(time.time_ns())))
POINTS += sorted(_rng.sample(range(1, TOTAL_SAVE_POINTS + 1), min(RANDOM, TOTAL_SAVE_POINTS)))


def check_intact(out) -> None:
    """Every save present loads; every state folder passes its manifest."""
    for f in out.glob("*.safetensors"):
        load_file(str(f))
    for s in out.glob("*-state"):
        read_position(s)


def resume_and_compare(out, tiny_args, baseline, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="tomlora"):
        # overwrite: a kill after the final LoRA was written (save points 16-22) leaves it
        assert run_inproc(tiny_args(out, 3, *SAVE_EVERY_STEP, "--resume", "latest",
                                    "--overwrite")) == 0
    assert "took over a stale lock" in caplog.text  # the killed run's lock
    assert leftovers(out) == []
    assert tensors_equal(out / "t.safetensors", baseline / "t.safetensors")
    for name in ("t-step00000001.safetensors", "t-step00000002.safetensors"):
        assert tensors_equal(out / name, baseline / name), name
    assert not (out / ".tomlora.lock").exists()


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_at_a_save_point_then_resume(point, tmp_path, tiny_args, baseline, caplog):
    out = tmp_path / "out"
    rc, err = run_cli(tiny_args(out, 3, *SAVE_EVERY_STEP), TOMLORA_FAULT=f"kill@{point}")
    assert rc == -signal.SIGKILL, err[-2000:]
    check_intact(out)
    left = sorted(p.name for p in out.iterdir() if is_leftover(p.name))
    if point in (9, 12):  # killed between writing and renaming: the temporary names remain
        assert left and all(n.startswith(".tomlora-tmp-t-step00000002") for n in left), left
    resume_and_compare(out, tiny_args, baseline, caplog)
    if left:
        assert all(f"removed {n}, left by an interrupted run" in caplog.text for n in left)


@pytest.mark.parametrize("step", [_rng.randint(1, 2) for _ in range(RANDOM)])
def test_sigkill_at_a_random_step_then_resume(step, tmp_path, tiny_args, baseline, caplog):
    out, flag = tmp_path / "out", tmp_path / "step"
    p = popen(tiny_args(out, 3, *SAVE_EVERY_STEP), TOMLORA_TEST_STEP_FILE=str(flag),
              TOMLORA_TEST_STEP=str(step))
    wait_for(flag, p)
    p.kill()
    p.communicate()
    check_intact(out)
    resume_and_compare(out, tiny_args, baseline, caplog)
