"""Caption files and caption processing (library/data/captions.py)."""

import random

import pytest

from library.data.captions import (
    CaptionError,
    caption_path,
    expand_wildcards,
    find_other_caption_files,
    join_tags,
    process_caption,
    read_caption,
    split_tags,
)

TAGS = "sks person, red hat, smiling, outdoors, blue sky, day, tree, grass"


def _many(caption, n=2000, **kwargs):
    return [process_caption(caption, rng=random.Random(seed), **kwargs) for seed in range(n)]


# --------------------------------------------------------------------------- caption files


@pytest.mark.parametrize(
    "content, wildcard, fallback, expected",
    [
        (b"a cat, sitting\n", False, None, "a cat, sitting"),
        (b"  padded  \n", False, None, "padded"),
        (b"first\nsecond\n", False, None, "first"),
        (b"\n\n  \nthird line wins\nlast\n", False, None, "third line wins"),
        (b"\xef\xbb\xbfwith bom", False, None, "with bom"),
        (b"crlf line\r\nnext\r\n", False, None, "crlf line"),
        (b"", False, "sks dog", "sks dog"),  # empty file -> fallback
        (b" \n\t\n", False, None, None),  # blank file, no fallback
        (b"one\n\ntwo\n three \n", True, None, ["one", "two", "three"]),
        (b"\xef\xbb\xbfonly\n", True, None, ["only"]),
        ("caf\u00e9 \u732b".encode(), False, None, "caf\u00e9 \u732b"),
    ],
)
def test_read_caption(tmp_path, content, wildcard, fallback, expected):
    image = tmp_path / "img.png"
    (tmp_path / "img.txt").write_bytes(content)
    assert read_caption(image, ".txt", fallback, wildcard) == expected


@pytest.mark.parametrize("fallback", [None, "sks dog"])
def test_read_caption_missing_file(tmp_path, fallback):
    assert read_caption(tmp_path / "img.png", ".txt", fallback, False) == fallback


def test_read_caption_extension_without_dot(tmp_path):
    (tmp_path / "img.caption").write_text("hello")
    assert read_caption(tmp_path / "img.jpg", "caption", None, False) == "hello"
    assert caption_path("d/img.jpeg", ".txt") == "d/img.txt"


def test_read_caption_not_utf8(tmp_path):
    (tmp_path / "img.txt").write_bytes(b"caf\xe9\n")  # latin-1
    with pytest.raises(CaptionError, match=r"img\.txt.*UTF-8"):
        read_caption(tmp_path / "img.png", ".txt", None, False)


@pytest.mark.parametrize(
    "files, extension, expected",
    [
        (["img.png", "img.caption"], ".txt", ["img.caption"]),
        (["img.png", "img.TXT"], ".txt", ["img.TXT"]),
        (["img.png", "img.png.txt"], ".txt", ["img.png.txt"]),
        (["img.png", "img.txt"], ".txt", []),  # the expected file is not "other"
        (["img.png", "img.npz", "img.jpg", "img2.txt", "im.txt"], ".txt", []),
        (["img.png", "img.txt", "img.tags", "img.json"], ".caption", ["img.json", "img.tags", "img.txt"]),
    ],
)
def test_find_other_caption_files(tmp_path, files, extension, expected):
    for name in files:
        (tmp_path / name).write_text("x")
    found = find_other_caption_files(tmp_path / "img.png", extension)
    assert found == [str(tmp_path / name) for name in expected]
    # Same answer from a precomputed folder listing.
    assert find_other_caption_files(tmp_path / "img.png", extension, siblings=files) == found


# --------------------------------------------------------------------------- deterministic processing


@pytest.mark.parametrize(
    "caption, kwargs, expected",
    [
        ("a,b ,  c", {}, "a,b ,  c"),  # nothing enabled: text kept as written
        ("line one\nline two", {}, "line one"),
        (["first", "second"], {}, "first"),
        ("a, b", {"prefix": "masterpiece,", "suffix": ", 4k"}, "masterpiece, a, b , 4k"),
        ("a, b", {"prefix": "pre"}, "pre a, b"),
        ("a;;;b, c", {"secondary_separator": ";;;"}, "a,b, c"),
        ("sks, man ||| hat, coat", {"keep_tokens_separator": "|||"}, "sks, man, hat, coat"),
        ("sks ||| hat, coat ||| best quality", {"keep_tokens_separator": "|||"},
         "sks, hat, coat, best quality"),
        ("a; b ;c;;", {"separator": ";", "tag_dropout_rate": 1e-12}, "a; b; c"),
        ("a, , b,", {"tag_dropout_rate": 1e-12}, "a, b"),  # empty tags dropped
        ("{{literal}} {red|red}", {"wildcard": True}, "{literal} red"),
        ("", {"prefix": "only prefix"}, "only prefix"),
    ],
)
def test_process_caption_deterministic(caption, kwargs, expected):
    assert process_caption(caption, rng=random.Random(0), **kwargs) == expected


@pytest.mark.parametrize(
    "caption, separator, keep, keep_sep, expected",
    [
        ("a, b, c, d", ",", 2, "", (["a", "b"], ["c", "d"], [])),
        ("a, b", ",", 5, "", (["a", "b"], [], [])),
        ("a|b|c", "|", 0, "", ([], ["a", "b", "c"], [])),
        ("a, b ### c, d ### e", ",", 1, "###", (["a", "b"], ["c", "d"], ["e"])),
        (" , a,, ", ",", 1, "", (["a"], [], [])),
    ],
)
def test_split_tags(caption, separator, keep, keep_sep, expected):
    assert split_tags(caption, separator, keep, keep_sep) == expected


@pytest.mark.parametrize(
    "separator, expected",
    [(",", "a, b, c"), (";", "a; b; c"), (", ", "a, b, c"), (" ", "a b c"), (".", "a. b. c")],
)
def test_join_tags(separator, expected):
    assert join_tags(["a", "b", "c"], separator) == expected


# --------------------------------------------------------------------------- shuffle / keep_tokens


@pytest.mark.parametrize("keep", [0, 1, 2, 3])
def test_shuffle_never_moves_kept_tags(keep):
    tags = [t.strip() for t in TAGS.split(",")]
    outputs = _many(TAGS, n=300, shuffle=True, keep_tokens=keep)
    for out in outputs:
        result = out.split(", ")
        assert result[:keep] == tags[:keep]
        assert sorted(result) == sorted(tags)  # nothing lost or duplicated
    assert len(set(outputs)) > 50  # really shuffled


def test_shuffle_keeps_custom_separator():
    out = process_caption("a|b|c|d", rng=random.Random(3), shuffle=True, separator="|", keep_tokens=1)
    assert out.startswith("a| ") and sorted(out.split("| ")) == ["a", "b", "c", "d"]


def test_keep_tokens_separator_with_shuffle():
    caption = "sks, woman ||| red dress, smile, park, bench ||| masterpiece, best quality"
    for out in _many(caption, n=200, shuffle=True, keep_tokens=7, keep_tokens_separator="|||"):
        tags = out.split(", ")
        assert tags[:2] == ["sks", "woman"] and tags[-2:] == ["masterpiece", "best quality"]
        assert sorted(tags[2:-2]) == ["bench", "park", "red dress", "smile"]


def test_prefix_and_suffix_never_shuffled():
    for out in _many("b, c, d", n=200, shuffle=True, prefix="PRE,", suffix="SUF"):
        assert out.startswith("PRE, ") and out.endswith(" SUF")


def test_same_seed_same_caption():
    kwargs = dict(shuffle=True, keep_tokens=1, tag_dropout_rate=0.3, dropout_rate=0.1)
    a = [process_caption(TAGS, rng=random.Random(42), **kwargs) for _ in range(3)]
    rng = random.Random(42)
    b = process_caption(TAGS, rng=rng, **kwargs)
    assert a == [b] * 3


# --------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("rate", [0.05, 0.3, 0.7])
def test_caption_dropout_rate(rate):
    outputs = _many(TAGS, n=4000, dropout_rate=rate, prefix="pre")
    dropped = sum(out == "" for out in outputs) / len(outputs)
    assert dropped == pytest.approx(rate, abs=0.03)
    assert all(out == "" or out.startswith("pre ") for out in outputs)


@pytest.mark.parametrize(
    "every, epochs_dropped",
    [(3, {3, 6}), (1, {1, 2, 3, 4, 5, 6}), (0, set())],
)
def test_caption_dropout_every_n_epochs(every, epochs_dropped):
    for epoch in range(0, 7):
        out = process_caption(TAGS, rng=random.Random(0), dropout_every_n_epochs=every, epoch=epoch)
        assert (out == "") == (epoch in epochs_dropped), epoch


@pytest.mark.parametrize("rate", [0.2, 0.5])
def test_tag_dropout_rate_spares_kept_tags(rate):
    tags = [t.strip() for t in TAGS.split(",")]
    outputs = _many(TAGS, n=1500, tag_dropout_rate=rate, keep_tokens=2)
    movable = len(tags) - 2
    kept_fraction = sum(len(out.split(", ")) - 2 for out in outputs) / (movable * len(outputs))
    assert kept_fraction == pytest.approx(1 - rate, abs=0.03)
    for out in outputs:
        result = out.split(", ")
        assert result[:2] == tags[:2]
        assert [t for t in tags if t in result[2:]] == result[2:]  # order kept without shuffle


# --------------------------------------------------------------------------- wildcard / warmup


def test_wildcard_choices():
    outputs = set(_many("a {red|blue|green} car, {big|small}", n=300, wildcard=True))
    assert outputs == {f"a {c} car, {s}" for c in ("red", "blue", "green") for s in ("big", "small")}


def test_wildcard_picks_a_line():
    outputs = set(_many(["photo of sks", "sks on a beach"], n=100, wildcard=True))
    assert outputs == {"photo of sks", "sks on a beach"}
    outputs = set(_many("line a\nline b\n", n=100, wildcard=True))
    assert outputs == {"line a", "line b"}


def test_wildcard_off_leaves_braces():
    assert process_caption("{a|b}", rng=random.Random(0)) == "{a|b}"
    assert expand_wildcards("x {{y}} {z}", random.Random(0)) == "x {y} z"


@pytest.mark.parametrize(
    "step, warmup, max_steps, expected_count",
    [
        (0, 10, 0, 1 + 1),  # 1 kept + token_warmup_min movable
        (5, 10, 0, 1 + 4),  # floor(5 * (7 - 1) / 10) + 1 = 4
        (9, 10, 0, 1 + 6),
        (10, 10, 0, 1 + 7),  # warmup over: everything
        (50, 0.5, 200, 1 + 4),  # fraction of max_train_steps: warmup = 100 steps, floor(50 * 6 / 100) + 1
        (100, 0.5, 200, 1 + 7),
    ],
)
def test_token_warmup(step, warmup, max_steps, expected_count):
    out = process_caption(
        TAGS, rng=random.Random(0), keep_tokens=1, token_warmup_step=warmup, token_warmup_min=1,
        step=step, max_train_steps=max_steps,
    )
    tags = out.split(", ")
    assert len(tags) == expected_count
    assert tags == [t.strip() for t in TAGS.split(",")][:expected_count]  # a prefix of the tags
