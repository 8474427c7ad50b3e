"""Finding images and captions on disk (library/data/sources.py, metadata.py)."""
from __future__ import annotations

import csv
import json
import pathlib
from pathlib import Path

import pytest

from library.data.options import SubsetOptions
from library.data.sources import Item, Scan, balance_reg, scan_sources, scan_subset
from tests.data.conftest import write_folder, write_image


def test_seed_002_layout_reads_with_the_reg_folder_warning(tmp_path):
    # ../shared/seeds/002: prepare_dataset() writes 10_{subject}_{class} with captions
    # "{subject} {class}" and 100_{class} for regularization images.
    root = tmp_path / "training_data"
    write_folder(root / "10_mysubject_person", 3, caption="mysubject person")
    write_folder(root / "100_person", 4, caption=None)
    scan = scan_sources(str(root), None, caption_extension=".txt")
    assert scan.problems == []
    by_folder = {(i.folder, i.repeats, i.caption) for i in scan.items}
    assert by_folder == {("10_mysubject_person", 10, "mysubject person"),
                         ("100_person", 100, "person")}
    reg_warning = [w for w in scan.warnings if "looks like regularization" in w]
    assert len(reg_warning) == 1
    assert "100_person" in reg_warning[0] and "10_mysubject_person" in reg_warning[0]
    assert "move it to reg_data_dir" in reg_warning[0]


def test_seed_000_metadata_csv_layout(tmp_path):
    dataset_dir = tmp_path / "robotcat_dataset"
    for i, cap in enumerate(["robotcat reading a book", "robotcat on a sofa"]):
        write_image(dataset_dir / f"img{i}.png", caption=cap)
    # The seed's own snippet, verbatim apart from the folder.
    csv_path = dataset_dir / "metadata.csv"
    with csv_path.open("w", newline="") as csvfile:
        writer = csv.writer(csvfile)
        writer.writerow(["file_name", "caption"])
        for img_file in pathlib.Path(dataset_dir).glob("*.png"):
            caption_file = img_file.with_suffix(".txt")
            caption = caption_file.read_text().strip()
            writer.writerow([img_file.name, caption])
    scan = scan_sources(str(dataset_dir), None, caption_extension=".txt")
    assert scan.problems == [] and scan.warnings == []
    assert sorted((i.image.name, i.caption, i.repeats) for i in scan.items) == [
        ("img0.png", "robotcat reading a book", 1), ("img1.png", "robotcat on a sofa", 1)]
    assert [(f.folder, f.images, f.captions) for f in scan.folders] == [("metadata.csv", 2, 2)]


def test_metadata_jsonl_with_another_caption_column(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png",
                                                         "text": "a red square"}) + "\n")
    scan = scan_sources(str(tmp_path), None, caption_extension=".txt", caption_column="text")
    assert [i.caption for i in scan.items] == ["a red square"]
    wrong = scan_sources(str(tmp_path), None, caption_extension=".txt")
    assert wrong.problems[0] == (f"{tmp_path / 'metadata.jsonl'}: row 1 has columns "
                                 "['file_name', 'text']; expected 'file_name' and 'caption' "
                                 "(set image_column / caption_column)")


def test_metadata_row_with_a_missing_image(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text("file_name,caption\na.png,ok\nb.png,gone\n")
    scan = scan_sources(str(tmp_path), None, caption_extension=".txt")
    assert [i.image.name for i in scan.items] == ["a.png"]
    assert scan.problems == [f"{tmp_path / 'metadata.csv'}: row 3: image "
                             f"{tmp_path / 'b.png'} not found (fix the file_name value or "
                             "add the file)"]


def test_caption_files_with_another_extension_are_named(tmp_path):
    root = tmp_path / "train"
    write_folder(root / "5_zkz dog", 2, caption="zkz dog running", caption_ext=".caption")
    scan = scan_sources(str(root), None, caption_extension=".txt")
    assert [i.caption for i in scan.items] == ["zkz dog", "zkz dog"]  # folder fallback
    assert scan.folders[0].other_caption_exts == [".caption"]
    (msg,) = scan.warnings
    assert msg == (f"{root / '5_zkz dog'}: 2 of 2 images have no .txt caption; they train "
                   "with the caption 'zkz dog'. Found .caption files instead: set "
                   "caption_extension = \".caption\"")
    fixed = scan_sources(str(root), None, caption_extension="caption")
    assert [i.caption for i in fixed.items] == ["zkz dog running"] * 2 and not fixed.warnings


def test_no_images_is_a_problem(tmp_path):
    (tmp_path / "empty").mkdir()
    scan = scan_sources(str(tmp_path / "empty"), None, caption_extension=".txt")
    assert scan.items == []
    assert scan.problems == [f"train_data_dir: no training images found in "
                             f"{tmp_path / 'empty'} (looked for png/jpg/jpeg/webp/bmp in "
                             "N_name subfolders, beside metadata.csv/jsonl, or in the folder "
                             "itself)"]


def test_folder_without_repeat_prefix_is_ignored_with_a_warning(tmp_path):
    write_folder(tmp_path / "5_ok", 1)
    write_folder(tmp_path / "person", 2)
    scan = scan_sources(str(tmp_path), None, caption_extension=".txt")
    assert {i.folder for i in scan.items} == {"5_ok"}
    assert scan.warnings == [f"{tmp_path / 'person'}: ignored: the folder name has no repeat "
                             "prefix; rename it like \"10_person\" (10 repeats) to train on it"]


def test_train_data_dir_pointing_at_the_image_folder(tmp_path):
    folder = tmp_path / "10_sks dog"
    write_folder(folder, 2)
    scan = scan_sources(str(folder), None, caption_extension=".txt")
    assert [i.repeats for i in scan.items] == [1, 1]
    (msg,) = scan.warnings
    assert msg.startswith(f"train_data_dir: {folder} holds 2 images directly; they train with "
                          "repeats 1.")
    assert f"set train_data_dir to its parent {str(tmp_path)!r}" in msg


def test_plain_folder_warns_like_kohya_would_not_find_it(tmp_path):
    write_folder(tmp_path / "imgs", 1)
    scan = scan_sources(str(tmp_path / "imgs"), None, caption_extension=".txt")
    assert "kohya expects them in subfolders like \"10_name class\"" in scan.warnings[0]


def _items(spec):
    """[(is_reg, repeats)] -> Items on fake paths (balance_reg reads no files)."""
    return [Item(Path(f"{k}.png"), "", r, reg, "f", True) for k, (reg, r) in enumerate(spec)]


@pytest.mark.parametrize("train, reg, expected", [
    ([10], [1, 1, 1], [4, 3, 3]),            # 10 samples: 3 + 7 extra repeats, in order
    ([5, 5, 5], [1, 1, 1, 1], [4, 4, 4, 3]),  # 15 training samples
    ([2], [1, 1, 1, 1, 1], [1, 1]),           # more reg than train: kohya keeps the first two
    ([3], [2, 2], [2, 2]),                    # whole images: 4 reg samples for 3 (kohya)
    ([4], [], []),
])
def test_reg_balancing_is_kohyas(train, reg, expected):
    items = _items([(False, r) for r in train] + [(True, r) for r in reg])
    out = balance_reg(items)
    assert [i.repeats for i in out if not i.is_reg] == train
    assert [i.repeats for i in out if i.is_reg] == expected
    if reg and min(reg) == 1:
        assert sum(expected) == sum(train)


def test_enable_wildcard_keeps_every_caption_line(tmp_path):
    img = write_image(tmp_path / "x.png")
    img.with_suffix(".txt").write_text("first line\n\nsecond {a|b}\n")
    scan = Scan()
    scan_subset(tmp_path, num_repeats=3, is_reg=False, class_tokens="cls",
                caption_extension=".txt", metadata_file=None,
                opts=SubsetOptions(enable_wildcard=True), scan=scan, label="s")
    assert [(i.caption, i.repeats) for i in scan.items] == [("first line\nsecond {a|b}", 3)]
    plain = Scan()
    scan_subset(tmp_path, num_repeats=1, is_reg=False, class_tokens=None,
                caption_extension=".txt", metadata_file=None, opts=SubsetOptions(),
                scan=plain, label="s")
    assert plain.items[0].caption == "first line"


def test_finetune_metadata_json(tmp_path):
    write_image(tmp_path / "imgs" / "a.png")
    write_image(tmp_path / "imgs" / "b.jpg")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"a": {"caption": "a cat", "tags": "cute, orange"},
                                "b.jpg": {"tags": "dog"}, "c": {"caption": "lost"}}))
    scan = Scan()
    scan_subset(tmp_path / "imgs", num_repeats=2, is_reg=False, class_tokens=None,
                caption_extension=".txt", metadata_file=meta, opts=SubsetOptions(), scan=scan,
                label="s")
    assert [(i.image.name, i.caption, i.repeats) for i in scan.items] == [
        ("a.png", "a cat, cute, orange", 2), ("b.jpg", "dog", 2)]
    assert scan.problems == [f"{meta}: image 'c' not found (as a path or in image_dir "
                             f"{str(tmp_path / 'imgs')!r}); fix the key or set image_dir"]
    assert scan.folders[0].repeats == 2


def test_subset_image_dir_with_kohya_folders_inside_gets_a_hint(tmp_path):
    write_folder(tmp_path / "train" / "10_sks dog", 1)
    scan = Scan()
    scan_subset(tmp_path / "train", num_repeats=1, is_reg=False, class_tokens=None,
                caption_extension=".txt", metadata_file=None, opts=SubsetOptions(), scan=scan,
                label="data.toml [[datasets]] #1")
    assert scan.items == []
    assert "holds kohya folders (10_sks dog): point image_dir at one of them" in \
        scan.warnings[0]


@pytest.mark.parametrize("class_captions, class_images, flagged", [
    (None, 2, True),         # class images without captions (seed 002's generated images)
    (None, 9, True),
    ("a person", 2, False),  # captioned: two real subject folders
    ("a person", 9, False),
])
def test_reg_lookalike_needs_class_image_signs(tmp_path, class_captions, class_images,
                                               flagged):
    write_folder(tmp_path / "10_sks person", 4, caption="sks person")
    write_folder(tmp_path / "5_person", class_images, caption=class_captions)
    scan = scan_sources(str(tmp_path), None, caption_extension=".txt")
    assert any("looks like regularization" in w for w in scan.warnings) == flagged
