"""docs/CONFIG.md is generated from the schema and kept current."""
from __future__ import annotations

from dataclasses import fields

from library.config import kohya_vocab, schema
from tests.config.helpers import REPO
from tools import gen_config_docs


def test_config_md_is_current():
    current = (REPO / "docs" / "CONFIG.md").read_text(encoding="utf-8")
    assert gen_config_docs.render() == current, \
        "docs/CONFIG.md is stale; run: python tools/gen_config_docs.py"


def test_check_mode(tmp_path, monkeypatch, capsys):
    assert gen_config_docs.main(["--check"]) == 0
    stale = tmp_path / "docs" / "CONFIG.md"
    stale.parent.mkdir()
    stale.write_text("old\n", encoding="utf-8")
    monkeypatch.setattr(gen_config_docs, "DOC_PATH", stale)
    monkeypatch.setattr(gen_config_docs, "ROOT", tmp_path)
    assert gen_config_docs.main(["--check"]) == 1
    assert "stale" in capsys.readouterr().err
    assert gen_config_docs.main([]) == 0
    assert gen_config_docs.main(["--check"]) == 0  # current after writing


def test_docs_cover_the_schema_and_the_cli():
    text = gen_config_docs.render()
    for sec, cls in schema.SECTIONS.items():
        assert f"### [{sec}]" in text
        for f in fields(cls):
            row = next(line for line in text.splitlines() if line.startswith(f"| `{f.name}` |"))
            assert ("**not implemented yet**" in row) == bool(f.metadata["planned"])
            for alias in f.metadata["aliases"]:
                assert f"`{alias}`" in row
            for choice in f.metadata["choices"]:
                assert f"`{choice}`" in row
    for alias in schema.SECTION_ALIASES:
        assert f"`[{alias}]`" in text
    for flag in ("--config_file", "--set", "--output_config"):
        assert f"`{flag} " in text
    for name in kohya_vocab.ALL_NAMES:  # the "Coming from sd-scripts" table
        assert any(line.startswith(f"| `{name}` |") for line in text.splitlines()), name
    for section in ("## Layers", "## Exit codes"):
        assert section in text
