"""wandb_run_name and wandb_api_key (library/train/tracking.py), and the key never leaving
the run: not in the saved config, the TensorBoard config text or the LoRA metadata.

wandb is not installed here and the tests have no network, so the Tracker's wandb calls are
recorded by a stand-in module put in its place for one test: it checks what the Tracker
asks of wandb (log in with the key, then start the run under the resolved name)."""
from __future__ import annotations

import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest

from library.config.output import config_to_dict, config_to_toml
from library.config.schema import Config, LoggingConfig
from library.train.saving import config_json
from library.train.tracking import Tracker, wandb_run_name

KEY = "0123456789abcdef-secret"


@pytest.mark.parametrize("configured, expected", [(None, "last_20250101-120000"),
                                                  ("", "last_20250101-120000"),
                                                  ("my run", "my run")])
def test_run_name_is_wandb_run_name_else_the_tensorboard_run(configured, expected):
    assert wandb_run_name(configured, Path("logs/last_20250101-120000")) == expected


def recording_wandb(calls: list):
    mod = types.ModuleType("wandb")
    mod.login = lambda **kw: calls.append(("login", kw))

    def init(**kw):
        calls.append(("init", kw))
        return types.SimpleNamespace(log=lambda *a, **k: None, finish=lambda: None)
    mod.init = init
    return mod


@pytest.mark.parametrize("name, key, expected_calls", [
    ("my run", KEY, [("login", {"key": KEY}), ("init", "my run")]),
    (None, None, [("init", "tb_run")]),          # no key: wandb's own login, no login call
])
def test_tracker_logs_in_with_the_key_then_names_the_run(tmp_path, monkeypatch, name, key,
                                                         expected_calls):
    calls: list = []
    monkeypatch.setitem(sys.modules, "wandb", recording_wandb(calls))
    t = Tracker(tmp_path / "tb_run", log_with="wandb", project="proj", wandb_name=name,
                wandb_key=key)
    t.close()
    got = [(c, kw["name"]) if c == "init" else (c, kw) for c, kw in calls]
    assert got == expected_calls
    init = calls[-1][1]
    assert init["project"] == "proj" and init["dir"] == str(tmp_path / "tb_run")


def test_the_api_key_is_never_written_out():
    cfg = replace(Config(), logging=LoggingConfig(log_with="wandb", wandb_api_key=KEY,
                                                  wandb_run_name="r"))
    assert KEY not in config_to_toml(cfg)          # saved config, TensorBoard text
    assert "wandb_api_key" not in config_to_dict(cfg)["logging"]   # wandb's run config
    assert KEY not in config_json(cfg)             # tomlora_config metadata, state fingerprint
    assert 'wandb_run_name = "r"' in config_to_toml(cfg)
