"""tools/demo.ensure_dataset: writes the demo's data and regularization images when they are
missing or from an older version, and leaves current ones alone."""
from __future__ import annotations

from tools import demo
from tools.make_demo_dataset import CAPTION


def test_writes_rewrites_stale_and_keeps_current(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # demo.DATA and demo.REG are relative to the repository root
    demo.ensure_dataset()
    first = demo.DATA / "10_zorblat toy" / "000.png"
    caption = first.with_suffix(".txt")
    assert caption.read_text().strip() == CAPTION.format(bg="green")
    assert len(list((demo.REG / "1_shapes").glob("*.png"))) == 20

    # a current dataset is left alone: a marker in a picture's caption survives
    kept = demo.DATA / "10_zorblat toy" / "005.txt"
    kept.write_text("edited by the user\n")
    demo.ensure_dataset()
    assert kept.read_text() == "edited by the user\n"

    # an older version's caption, or a missing caption, makes it rewrite everything
    for stale in ("zorblat, a purple star, on a green background\n", None):
        if stale is None:
            caption.unlink()
        else:
            caption.write_text(stale)
        demo.ensure_dataset()
        assert caption.read_text().strip() == CAPTION.format(bg="green")
        assert kept.read_text().startswith("zorblat, a purple star in a red circle")
        kept.write_text("edited by the user\n")
