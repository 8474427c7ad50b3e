"""Caption files and per-sample caption processing (kohya semantics, explicit randomness).

``read_caption`` and ``find_other_caption_files`` read the disk; ``process_caption`` is pure:
all randomness comes from the ``random.Random`` passed in, so a seeded run is reproducible
and a test can pin the output.

``process_caption`` follows kohya-ss/sd-scripts ``BaseDataset.process_caption``
(library/train_util.py), in the same order and with the same draws from the rng:
caption dropout -> wildcard choice -> tag split (keep_tokens / keep_tokens_separator) ->
token warmup -> shuffle -> tag dropout -> join -> secondary separator. Deliberate
differences, each for a reason:

* prefix and suffix are attached after the tags are processed, so they are never
  shuffled, dropped or counted in ``keep_tokens`` (kohya glues them on first, so a prefix
  merges into the first tag);
* empty tags ("a,,b", a trailing comma) are dropped in every mode, so ``keep_tokens`` counts
  real tags;
* tags are rejoined with the separator the user chose (", " for ","), not always ", ";
* a caption containing ``keep_tokens_separator`` is always split, so the separator never
  reaches the text encoder even when shuffling is off.
"""

from __future__ import annotations

import math
import os
import random
import re
from typing import Iterable, Sequence

# Extensions that caption tools commonly write; used to explain a missing caption.
_COMMON_CAPTION_EXTENSIONS = (".txt", ".caption", ".captions", ".tags", ".tag", ".text", ".cap", ".json")
# Files next to an image that are never captions (our caches, other images).
_NOT_CAPTIONS = (".npz", ".safetensors", ".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".avif", ".jxl")

_WILDCARD = re.compile(r"\{([^{}]+)\}")


class CaptionError(ValueError):
    """A caption file that cannot be read; the message names the file and the fix."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def caption_path(image_path: str | os.PathLike, caption_extension: str) -> str:
    """The caption file for an image: the image path with its extension replaced.

    ``caption_extension`` may be given with or without the leading dot ("txt" or ".txt").
    """
    extension = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    return os.path.splitext(os.fspath(image_path))[0] + extension


def read_caption(
    image_path: str | os.PathLike,
    caption_extension: str,
    fallback: str | None = None,
    enable_wildcard: bool = False,
) -> str | list[str] | None:
    """The caption for an image from its caption file, or ``fallback``.

    The file is read as UTF-8 (a BOM is removed); lines are stripped and empty ones skipped.
    Without ``enable_wildcard`` the first non-empty line is returned (kohya reads line 1
    only); with it, every non-empty line, as a list, one of which ``process_caption`` picks
    per sample. A missing or blank file gives ``fallback`` (the class tokens in kohya's
    folder layout), which may be None. A file that is not UTF-8 raises ``CaptionError``.
    """
    path = caption_path(image_path, caption_extension)
    if not os.path.isfile(path):
        return fallback
    try:
        with open(path, "rb") as handle:
            text = handle.read().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CaptionError(path, f"not UTF-8 text ({exc}); re-save the file as UTF-8") from exc
    except OSError as exc:
        raise CaptionError(path, f"cannot read the caption file ({exc})") from exc
    lines = [line.replace("\ufeff", "").strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return fallback
    return lines if enable_wildcard else lines[0]


def find_other_caption_files(
    image_path: str | os.PathLike, caption_extension: str, siblings: Iterable[str] | None = None
) -> list[str]:
    """Files that look like this image's caption but have another extension, sorted paths.

    For the doctor's message when the expected caption is missing, e.g. "img.caption"
    exists but ``caption_extension`` is ".txt". Matches "img.<ext>" (any extension other than
    the expected one, including a different case such as "img.TXT") and "img.png.txt"
    (taggers that append to the full file name). ``siblings`` (file names in the image's
    folder) avoids listing the folder once per image; it is read from disk when None.
    """
    image_path = os.fspath(image_path)
    folder, image_name = os.path.split(image_path)
    stem = os.path.splitext(image_name)[0]
    expected = os.path.basename(caption_path(image_path, caption_extension))
    if siblings is None:
        try:
            siblings = os.listdir(folder or ".")
        except OSError:
            return []
    found = []
    for name in siblings:
        if name in (image_name, expected):
            continue
        base, extension = os.path.splitext(name)
        if not extension or extension.lower() in _NOT_CAPTIONS:
            continue
        same_stem = base == stem
        appended = base == image_name and extension.lower() in _COMMON_CAPTION_EXTENSIONS
        if same_stem or appended:
            found.append(os.path.join(folder, name))
    return sorted(found)


def process_caption(
    caption: str | Sequence[str],
    *,
    rng: random.Random,
    shuffle: bool = False,
    keep_tokens: int = 0,
    separator: str = ",",
    keep_tokens_separator: str = "",
    secondary_separator: str = "",
    prefix: str = "",
    suffix: str = "",
    dropout_rate: float = 0.0,
    dropout_every_n_epochs: int = 0,
    epoch: int = 0,
    tag_dropout_rate: float = 0.0,
    token_warmup_min: int = 1,
    token_warmup_step: float = 0,
    step: int = 0,
    max_train_steps: int = 0,
    wildcard: bool = False,
) -> str:
    """The caption one training sample sees (kohya's ``process_caption``).

    * Caption dropout: "" (no prefix/suffix either) with probability ``dropout_rate``, and in
      every epoch where ``epoch % dropout_every_n_epochs == 0``; ``epoch`` is 1-based, as in
      kohya, and epoch 0 is never dropped.
    * ``wildcard``: one line of a multi-line caption (or list) is chosen, and every
      ``{a|b|c}`` is replaced by one option; "{{" and "}}" stand for literal braces. Without
      it the first line is used.
    * Tags are split on ``separator`` and stripped when shuffling, tag dropout or token warmup
      is on (otherwise the text is kept as written). The first ``keep_tokens`` tags stay in
      front; with ``keep_tokens_separator`` present, the part before it is kept in front and
      a part after a second occurrence is kept at the end instead.
    * Token warmup: before step ``token_warmup_step`` (a fraction < 1 means that fraction of
      ``max_train_steps``) only the first floor(step * (n - min) / warmup) + min of the n
      movable tags are used, growing from ``token_warmup_min``.
    * The movable tags are shuffled, then each is dropped with ``tag_dropout_rate``.
    * Tags are rejoined with ``separator`` plus a space ("a, b, c"); ``secondary_separator``
      is then replaced by ``separator``; ``prefix`` and ``suffix`` are attached with a space.
    """
    is_dropped = dropout_rate > 0 and rng.random() < dropout_rate
    if dropout_every_n_epochs > 0 and epoch > 0 and epoch % dropout_every_n_epochs == 0:
        is_dropped = True
    if is_dropped:
        return ""

    text = _choose_line(caption, rng, wildcard)
    if wildcard:
        text = expand_wildcards(text, rng)
        prefix = expand_wildcards(prefix, rng) if prefix else prefix
        suffix = expand_wildcards(suffix, rng) if suffix else suffix

    warmup_steps = _resolve_warmup(token_warmup_step, max_train_steps)
    has_keep_separator = bool(keep_tokens_separator) and keep_tokens_separator in text
    if shuffle or warmup_steps > 0 or tag_dropout_rate > 0 or has_keep_separator:
        head, movable, tail = split_tags(text, separator, keep_tokens, keep_tokens_separator)
        if warmup_steps > 0 and step < warmup_steps:
            count = math.floor(step * (len(movable) - token_warmup_min) / warmup_steps) + token_warmup_min
            movable = movable[:count]
        if shuffle:
            rng.shuffle(movable)
        if tag_dropout_rate > 0:
            movable = [tag for tag in movable if rng.random() >= tag_dropout_rate]
        text = join_tags(head + movable + tail, separator)

    if secondary_separator:
        text = text.replace(secondary_separator, separator)
    return " ".join(part for part in (prefix.strip(), text, suffix.strip()) if part)


def split_tags(
    caption: str, separator: str = ",", keep_tokens: int = 0, keep_tokens_separator: str = ""
) -> tuple[list[str], list[str], list[str]]:
    """(kept in front, movable, kept at the end) tags of a one-line caption; empties dropped."""

    def tags(part: str) -> list[str]:
        return [tag.strip() for tag in part.split(separator) if tag.strip()]

    if keep_tokens_separator and keep_tokens_separator in caption:
        head, rest = caption.split(keep_tokens_separator, 1)
        tail = ""
        if keep_tokens_separator in rest:
            rest, tail = rest.split(keep_tokens_separator, 1)
        return tags(head), tags(rest), tags(tail)
    all_tags = tags(caption)
    keep = max(0, keep_tokens)
    return all_tags[:keep], all_tags[keep:], []


def join_tags(tags: Sequence[str], separator: str = ",") -> str:
    """Tags joined by ``separator`` followed by one space (", " for ","), unless it is blank."""
    glue = separator if not separator.strip() or separator.endswith(" ") else separator + " "
    return glue.join(tags)


def expand_wildcards(text: str, rng: random.Random) -> str:
    """Replace every ``{a|b|c}`` with one option chosen by ``rng``; "{{"/"}}" are literal braces."""
    open_mark, close_mark = "\u2985", "\u2986"  # placeholders that cannot be in the text
    while open_mark in text or close_mark in text:
        open_mark += "\u2985"
        close_mark += "\u2986"
    text = text.replace("{{", open_mark).replace("}}", close_mark)
    text = _WILDCARD.sub(lambda match: rng.choice(match.group(1).split("|")), text)
    return text.replace(open_mark, "{").replace(close_mark, "}")


def _choose_line(caption: str | Sequence[str], rng: random.Random, wildcard: bool) -> str:
    lines = caption.split("\n") if isinstance(caption, str) else list(caption)
    if wildcard and len(lines) > 1:
        lines = [line for line in lines if line.strip()] or [""]
        return rng.choice(lines).strip()
    return lines[0].strip() if lines else ""


def _resolve_warmup(token_warmup_step: float, max_train_steps: int) -> int:
    """Kohya: a value below 1 is a fraction of the total steps."""
    if token_warmup_step <= 0:
        return 0
    if token_warmup_step < 1:
        return math.floor(token_warmup_step * max_train_steps)
    return int(token_warmup_step)
