"""Sweep planning without training: value splitting and quoting, run names, sweep TOMLs,
the argv each run gets (read back by the real config loader), --dry-run, config errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import tomli_w

from library.config import load_config
from library.sweep.plan import Run, Sweep, build_runs, cli_axes, read_sweep_toml, run_argv
from library.sweep.values import MAX_NAME, SweepError, from_toml, parse_assignment, \
    run_name, split_values
from tools import sweep as sweep_tool


@pytest.mark.parametrize("text, parts", [
    ("8,16", ["8", "16"]),
    ("1e-4", ["1e-4"]),
    ("[768,512],[512,768]", ["[768,512]", "[512,768]"]),
    ('"a, b",c', ['"a, b"', "c"]),
    ("'x,y',\"z\"", ["'x,y'", '"z"']),
    ("it's,fine", ["it's", "fine"]),                   # an apostrophe is not a quote
    ("ünï,東京 タワー", ["ünï", "東京 タワー"]),
    ("/data/my set,/data/other set", ["/data/my set", "/data/other set"]),
    ('["a,b", "c"],(1,2),{x,y}', ['["a,b", "c"]', "(1,2)", "{x,y}"]),
    ("", [""]),
])
def test_split_values(text, parts):
    assert split_values(text) == parts


@pytest.mark.parametrize("text", ["[1,2", '"abc', "1]", "[1,2),3"])
def test_split_values_refuses_unbalanced(text):
    with pytest.raises(ValueError):
        split_values(text)


def resolved(overrides, tmp_path: Path):
    """The Config train_network.py would build for a run with these overrides."""
    run = Run(run_name(tuple(overrides)), tuple(overrides))
    argv = run_argv(Sweep(None), run, tmp_path / run.name, tmp_path / "logs")
    return load_config(argv, check_paths=False).config


@pytest.mark.parametrize("item, attr, expected", [
    ("dataset.resolution=[768,512]", "resolution", (768, 512)),
    ('caption_prefix="a, b"', "caption_prefix", "a, b"),
    ("caption_prefix=ünï 東京", "caption_prefix", "ünï 東京"),
    ("train_data_dir=/data/my set/x", "train_data_dir", "/data/my set/x"),
    ("caption_prefix=it's", "caption_prefix", "it's"),
])
def test_cli_values_reach_the_config(item, attr, expected, tmp_path):
    _, overrides = parse_assignment(item)
    assert getattr(resolved(overrides[:1], tmp_path).dataset, attr) == expected


@pytest.mark.parametrize("key, value, get", [
    ("caption_prefix", "8", lambda c: c.dataset.caption_prefix),       # str stays str
    ("caption_prefix", 'say "hi", ok', lambda c: c.dataset.caption_prefix),
    ("caption_prefix", "none", lambda c: c.dataset.caption_prefix),
    ("dataset.resolution", [768, 512], lambda c: list(c.dataset.resolution)),
    ("optimizer.learning_rate", 5e-05, lambda c: c.optimizer.learning_rate),
    ("network_dim", 16, lambda c: c.lora.network_dim),
    ("flip_aug", True, lambda c: c.dataset.flip_aug),
    ("network_args", {"conv_dim": 4, "conv_alpha": 2.0},
     lambda c: c.lora.network_args),
])
def test_toml_values_reach_the_config(key, value, get, tmp_path):
    assert get(resolved([from_toml(key, value)], tmp_path)) == value


def test_run_names_are_filesystem_safe_and_unique():
    runs = build_runs(cli_axes(["network_dim=8,16", "optimizer.learning_rate=1e-4"]))
    assert [r.name for r in runs] == ["network_dim=8__learning_rate=1e-4",
                                      "network_dim=16__learning_rate=1e-4"]
    odd = build_runs(cli_axes(['caption_prefix="a b",a/b,ünï', "resolution=[768,512]"]))
    names = [r.name for r in odd]
    assert names[2] == "caption_prefix=ünï__resolution=768_512"
    assert names[0] != names[1] and names[0].startswith("caption_prefix=a_b__resolution=")
    assert all("/" not in n and " " not in n and '"' not in n for n in names)
    long = build_runs(cli_axes(["train_data_dir=" + "/very long folder" * 20]))
    assert len(long[0].name) <= MAX_NAME


@pytest.mark.parametrize("items, message", [
    (["output_dir=a,b"], "set by the sweep"),
    (["learning_rate=1", "optimizer.learning_rate=2"], "swept twice"),
    (["network_dim"], "expected key=value"),
    (["resolution=[64,64"], "unclosed"),
    (["network_dim=8,8"], "listed twice"),
])
def test_bad_sweep_requests(items, message):
    with pytest.raises(SweepError) as e:
        build_runs(cli_axes(items))
    assert message in str(e.value)


def test_sweep_toml(tmp_path):
    (tmp_path / "sweeps").mkdir()
    path = tmp_path / "sweeps" / "s.toml"
    path.write_text(
        'base = "../base.toml"\nname = "rank"\n'
        '[sweep]\nnetwork_dim = [8, 16]\n"optimizer.learning_rate" = [1e-4]\n'
        'dataset.caption_prefix = ["a, b"]\n'
        '[[runs]]\nnetwork_alpha = 4\n[[runs]]\nnetwork_alpha = 8\nlora = {dropout = 0.1}\n',
        encoding="utf-8")
    s = read_sweep_toml(path)
    assert Path(s.base) == tmp_path / "sweeps" / ".." / "base.toml" and s.name == "rank"
    runs = build_runs(s.axes)
    assert len(runs) == 2 * 1 * 1 * 2
    assert runs[-1].name == ("network_dim=16__learning_rate=0.0001__caption_prefix=a_b__"
                             "network_alpha=8__dropout=0.1")
    path.write_text('bsae = "x.toml"\n[sweep]\nnetwork_dim = 8\n', encoding="utf-8")
    with pytest.raises(SweepError) as e:
        read_sweep_toml(path)
    assert "did you mean base?" in str(e.value) and "non-empty list" in str(e.value)


@pytest.fixture
def base_toml(tmp_path) -> Path:
    data = tmp_path / "data set"
    (data / "1_x").mkdir(parents=True)
    path = tmp_path / "base.toml"
    path.write_text(tomli_w.dumps({
        "model": {"pretrained_model_name_or_path": str(tmp_path / "no model needed")},
        "dataset": {"train_data_dir": str(data), "resolution": 64},
        "saving": {"output_name": "t"}}), encoding="utf-8")
    return path


def test_dry_run_prints_the_plan_and_writes_nothing(base_toml, tmp_path, capsys):
    out = tmp_path / "swéep out"
    rc = sweep_tool.main([str(base_toml), "network_dim=2,4", "learning_rate=1e-3,2e-3",
                          "--out", str(out), "--dry-run", "--", "--max_train_steps", "2"])
    text = capsys.readouterr().out
    assert rc == 0 and not out.exists()
    assert "4 runs" in text and text.count("] run: ") == 4
    assert "network_dim=4__learning_rate=2e-3" in text
    assert "--set network_dim=4 --set learning_rate=2e-3" in text
    assert f"'{out}/network_dim=2__learning_rate=1e-3'" in text  # shell-quoted for display


def test_config_error_stops_the_sweep_before_any_run(base_toml, tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = sweep_tool.main([str(base_toml), "network_dim=2,4",
                          "lr_scheduler=constant,cosine_wrong", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert "cosine_wrong" in err and "did you mean" in err
    assert "runs: network_dim=2__lr_scheduler=cosine_wrong, " \
           "network_dim=4__lr_scheduler=cosine_wrong" in err
    rc = sweep_tool.main([str(base_toml), "network_dimm=2,4", "--out", str(out), "--",
                          "--learning_rat", "1e-4"])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert "unknown key network_dimm (did you mean network_dim?) (run: network_dimm=4)" in err
    assert err.count("--learning_rat:") == 1  # a problem every run has is listed once
