"""Ctrl-C (SIGINT) and SIGTERM on a real subprocess, signalled right after step 1 (the
TOMLORA_TEST_STEP_FILE hook pauses there, so no timing guess), and the output_dir lock: a
second run in the same folder meanwhile is refused, naming the first."""
from __future__ import annotations

import signal

from safetensors.torch import load_file

from library.train.state import read_position
from tests.reliability.conftest import SAVE_EVERY_STEP, leftovers, popen, run_cli, \
    run_inproc, tensors_equal, wait_for


def test_a_second_run_is_refused_and_ctrl_c_saves_the_step_for_an_exact_resume(
        tmp_path, tiny_args, baseline, capsys):
    out, flag = tmp_path / "out", tmp_path / "step"
    p = popen(tiny_args(out, 3, "--save_state"), TOMLORA_TEST_STEP_FILE=str(flag))
    wait_for(flag, p)
    # the same output_dir meanwhile: refused before any model loads, naming the first run
    assert run_inproc(tiny_args(out, 3, "--save_state", "--seed", "2")) == 2
    err = capsys.readouterr().err
    assert f"is in use by another run (PID {p.pid} on " in err
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    state = out / "t-step00000001-state"
    assert err.strip().splitlines()[-1] == (
        f"SIGINT: stopped after step 1; saved {out / 't-step00000001.safetensors'} and "
        f"{state}; resume with --resume {state}")
    assert read_position(state)[0].step == 1 and leftovers(out) == []
    assert not (out / ".tomlora.lock").exists() and not (out / "t.safetensors").exists()
    assert tensors_equal(out / "t-step00000001.safetensors",
                         baseline / "t-step00000001.safetensors")
    # the saved step resumes to the uninterrupted run's LoRA, bit for bit
    assert run_inproc(tiny_args(out, 3, "--save_state", "--resume", str(state))) == 0
    assert tensors_equal(out / "t.safetensors", baseline / "t.safetensors")


def test_sigterm_saves_the_step_and_exits_143(tmp_path, tiny_args):
    out, flag = tmp_path / "out", tmp_path / "step"
    p = popen(tiny_args(out, 3), TOMLORA_TEST_STEP_FILE=str(flag))  # no save_state
    wait_for(flag, p)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"SIGTERM: stopped after step 1; saved {out / 't-step00000001.safetensors'}")
    load_file(str(out / "t-step00000001.safetensors"))
    assert leftovers(out) == [] and not list(out.glob("*-state"))


def test_a_second_ctrl_c_inside_a_state_save_stops_at_once_and_tears_nothing(
        tmp_path, tiny_args, baseline):
    # save points 3 and 4 lie inside the step-1 state save (tests/reliability/conftest.py):
    # the first Ctrl-C asks for a graceful stop, the second stops in the middle of the save
    out = tmp_path / "out"
    rc, err = run_cli(tiny_args(out, 3, *SAVE_EVERY_STEP), TOMLORA_FAULT="sigint@3,sigint@4")
    assert rc == 130, err[-3000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("SIGINT: stopped at once; files saved "
                                                   "before are intact")
    assert leftovers(out) == [] and not list(out.glob("*-state"))
    assert not (out / ".tomlora.lock").exists()
    assert tensors_equal(out / "t-step00000001.safetensors",
                         baseline / "t-step00000001.safetensors")
