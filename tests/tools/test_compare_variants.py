"""tools/compare_variants.py: the command each variant trains with, the table of recorded runs
(--summarise), and one real variant trained and measured end to end on the tiny model."""
from __future__ import annotations

import json
from pathlib import Path

from tools import compare_variants as cv


def test_variants_without_reg_images_clear_the_reg_folder_and_keep_their_flags(tmp_path):
    data, reg, out = tmp_path / "data", tmp_path / "reg", tmp_path / "run"
    plain = cv.train_command("plain", 0, data, reg, out, 300, cv.MODEL)
    assert plain[plain.index("--reg_data_dir") + 1] == str(reg)
    kept = cv.train_command("preservation_w4", 3, data, reg, out, 300, cv.MODEL)
    assert kept[kept.index("--reg_data_dir") + 1] == ""
    assert kept.count("--reg_data_dir") == 1
    assert kept[-2:] == ["--preservation_weight", "4.0"]
    assert kept[kept.index("--seed") + 1] == "3"
    ema = cv.train_command("ema", 0, data, reg, out, 50, cv.MODEL)
    assert ema[-2:] == ["--ema_decay", "0.99"]
    assert ema[ema.index("--max_train_steps") + 1] == "50"


def record(variant, seed, concept, diff, agree, shift):
    return {"variant": variant, "seed": seed, "rc": 0, "concept_before": 0.0,
            "concept_after": concept, "plain_diff": diff, "unrelated_diff": 0.4,
            "plain_agreement": agree, "shift_plain": shift, "shift_class": 2 * shift}


def test_summarise_prints_the_means_of_runs_recorded_in_several_files(tmp_path, capsys):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps(record("ema", 0, 0.5, 0.10, 0.25, 0.02)) + "\n")
    b.write_text("\n".join(json.dumps(r) for r in [
        record("ema", 1, 1.0, 0.20, 0.75, 0.04), record("plain", 1, 0.75, 0.3, 0.5, 0.01),
        {"variant": "plain", "seed": 2, "rc": 1, "train_s": 1.0}]) + "\n")
    assert cv.main(["--summarise", str(a), str(b)]) == 0
    table = capsys.readouterr().out
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert lines[1].startswith("| plain | 75% (75%) | 0.300 (0.400) | 50% (50%) | 0.0100 (0.0200)")
    assert lines[2].startswith("| ema | 75% (50% / 100%) | 0.150 (0.400) | 50% (25% / 75%) | "
                               "0.0300 (0.0600)")
    assert "4 runs from" in table


def test_summarise_names_an_unreadable_record(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(record("ema", 0, 1, 0.1, 1, 0.01)) + "\n{torn\n")
    assert cv.main(["--summarise", str(bad)]) == 2
    assert f"{bad} line 2 is not a JSON run record" in capsys.readouterr().err
    assert cv.main(["--summarise", str(tmp_path / "missing.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_one_variant_trains_and_is_measured_end_to_end(tmp_path, capsys):
    out = tmp_path / "v.json"
    assert cv.main(["--variants", "ema", "--seeds", "0", "--steps", "2", "--n", "1",
                    "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    (run,) = report["results"]
    assert run["variant"] == "ema" and run["rc"] == 0
    assert Path(tmp_path / "work" / "ema-s0" / "out" / "zorblat.safetensors").is_file()
    assert 0.0 < run["shift_plain"] < 1.0 and run["plain_diff"] >= 0.0
    assert report["summary"][0]["runs"] == 1
    assert json.loads((tmp_path / "v.jsonl").read_text())["variant"] == "ema"
    assert "| ema |" in capsys.readouterr().out
