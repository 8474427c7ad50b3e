"""kohya's dataset TOML (`dataset_config`): `[general]`, `[[datasets]]`, `[[datasets.subsets]]`.

The keys are kohya-ss/sd-scripts' (library/config_util.py, ConfigSanitizer): dataset keys
(batch_size, resolution, buckets) in `[general]` or a `[[datasets]]` entry; subset keys
(repeats, class tokens, caption options, augmentation) in any of the three levels, the
more specific level winning; `image_dir`, `is_reg` and `metadata_file` only in a subset.

Precedence, lowest first: built-in defaults < the `--config_file` file < `[general]` <
`[[datasets]]` < `[[datasets.subsets]]` < command-line flags. So the main config supplies
defaults the dataset file can refine, and a flag typed on the command line always wins (the
layer order of docs/CONFIG.md). `train_data_dir` / `reg_data_dir` are ignored with a warning.

Paths are relative to the working directory, as in kohya; a path that does not exist there
but does beside the dataset TOML is taken from there. Every problem is collected and raised
at once as a ``ConfigError`` (exit 2) naming the file, the entry and the key.
"""
from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from library.config import values
from library.config.loader import ConfigError, check_field
from library.config.schema import DatasetConfig
from library.data import buckets as B
from library.data.options import DataOptions, SubsetOptions

# Dataset-level keys (kohya DATASET_ASCENDABLE_SCHEMA); `batch_size` is our train_batch_size.
DATASET_KEYS = ("batch_size", "resolution", "enable_bucket", "min_bucket_reso",
                "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale",
                "network_multiplier", "validation_seed", "validation_split")
# Subset keys that may also be written at dataset or general level (kohya's "ascendable").
SUBSET_KEYS = tuple(f.name for f in fields(SubsetOptions)) + (
    "num_repeats", "caption_extension", "class_tokens", "cache_info", "color_aug",
    "face_crop_aug_range", "custom_attributes", "resize_interpolation")
# Keys of one subset only.
SUBSET_ONLY_KEYS = ("image_dir", "is_reg", "metadata_file", "conditioning_data_dir")

# Types of keys that are not schema keys (the schema's own fields type the rest).
_OWN_TYPES = {"num_repeats": "int", "class_tokens": "Optional[str]", "cache_info": "bool",
              "image_dir": "str", "is_reg": "bool", "metadata_file": "str",
              "conditioning_data_dir": "str", "network_multiplier": "float",
              "validation_seed": "int", "validation_split": "float", "color_aug": "bool",
              "face_crop_aug_range": "list", "custom_attributes": "dict",
              # accepted, no effect: images are resized with a fixed filter
              "resize_interpolation": "Optional[str]"}
_SCHEMA_NAME = {"batch_size": "train_batch_size"}
# Keys kohya accepts that we do not implement: (value that is fine, why / what to do).
_UNSUPPORTED = {
    "color_aug": (False, "colour augmentation is not supported (it also breaks latent "
                  "caching in kohya); remove it"),
    "face_crop_aug_range": (None, "face-crop augmentation is not supported; remove it"),
    "custom_attributes": ({}, "custom_attributes are not supported; remove them"),
}


@dataclass(frozen=True)
class SubsetSpec:
    label: str                     # where it was written, for messages
    image_dir: Path | None
    metadata_file: Path | None
    num_repeats: int
    is_reg: bool
    class_tokens: str | None
    caption_extension: str
    opts: SubsetOptions
    conditioning_data_dir: Path | None = None   # masked_loss: the subset's mask images


@dataclass(frozen=True)
class DatasetSpec:
    label: str
    options: DataOptions
    subsets: tuple[SubsetSpec, ...]


def read_dataset_config(path: str | Path, d: DatasetConfig, cli_keys=(),
                        default_resolution: tuple[int, int] = (512, 512)
                        ) -> tuple[list[DatasetSpec], list[str]]:
    """(datasets, warnings) of a kohya dataset TOML; raises ConfigError with every problem.

    `d` is the resolved [dataset] section (config file + CLI), `cli_keys` the canonical keys
    given on the command line (they override the dataset file).
    """
    r = _Reader(Path(path), d, set(cli_keys), default_resolution)
    specs = r.read()
    if r.problems:
        raise ConfigError(r.problems)
    return specs, r.warnings


def read_inline_subsets(subsets: list, origin: str, d: DatasetConfig, cli_keys=(),
                        default_resolution: tuple[int, int] = (512, 512)
                        ) -> tuple[list[DatasetSpec], list[str]]:
    """(datasets, warnings) of the `[[subsets]]` written in the main config itself (as
    LoRA_Easy_Training_Scripts writes them): one dataset whose options come from the main
    config. `origin` names the config file in messages; raises ConfigError."""
    r = _Reader(Path(origin), d, set(cli_keys), default_resolution)
    specs = r.read_subsets(subsets)
    if r.problems:
        raise ConfigError(r.problems)
    return specs, r.warnings


class _Reader:
    def __init__(self, path: Path, d: DatasetConfig, cli: set[str], default_res):
        self.path, self.d, self.cli, self.default_res = path, d, cli, tuple(default_res)
        self.problems: list[str] = []
        self.warnings: list[str] = []
        self.schema_fields = {f.name: f for f in fields(DatasetConfig)}

    # ---- reading and checking the raw tables -----------------------------------------
    def read(self) -> list[DatasetSpec]:
        try:
            data = tomllib.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            self.problems.append(f"dataset_config: file {str(self.path)!r} not found")
            return []
        except (OSError, UnicodeDecodeError) as e:
            self.problems.append(f"{self.path}: cannot read the dataset config: {e}")
            return []
        except tomllib.TOMLDecodeError as e:
            self.problems.append(f"{self.path}: invalid TOML: {e} (fix the syntax at that "
                                 "line and column)")
            return []
        for key in data:
            if key not in ("general", "datasets"):
                self.problems.append(f"{self.path}: {key}: unknown top-level key or section"
                                     f"{_suggest(key, ('general', 'datasets'))}; a dataset "
                                     "config has [general] and [[datasets]] only")
        general = self._table(data.get("general", {}), "[general]",
                              DATASET_KEYS + SUBSET_KEYS)
        datasets = data.get("datasets", [])
        if not isinstance(datasets, list) or not datasets:
            self.problems.append(f"{self.path}: no [[datasets]] entries; add at least one "
                                 "[[datasets]] with a [[datasets.subsets]] image_dir")
            return []
        if self.d.train_data_dir or self.d.reg_data_dir:
            self.warnings.append(f"{self.path}: dataset_config is given, so train_data_dir "
                                 "/ reg_data_dir are ignored (as in kohya)")
        if getattr(self.d, "in_json", None):
            self.warnings.append(f"{self.path}: dataset_config is given, so in_json is "
                                 "ignored (as in kohya); use a subset's metadata_file")
        specs = []
        for i, ds in enumerate(datasets, start=1):
            where = f"[[datasets]] #{i}"
            table = self._table(ds, where, DATASET_KEYS + SUBSET_KEYS + ("subsets",))
            subsets = table.pop("subsets", [])
            if not isinstance(subsets, list) or not subsets:
                self.problems.append(f"{self.path}: {where}: no [[datasets.subsets]]; add "
                                     "one with image_dir (or metadata_file)")
                continue
            subs = []
            for j, sub in enumerate(subsets, start=1):
                sub_where = f"{where} [[datasets.subsets]] #{j}"
                st = self._table(sub, sub_where, SUBSET_KEYS + SUBSET_ONLY_KEYS)
                spec = self._subset(sub_where, [st, table, general])
                if spec is not None:
                    subs.append(spec)
            options = self._dataset_options(where, [table, general])
            if options is not None and subs:
                specs.append(DatasetSpec(f"{self.path.name} {where}", options, tuple(subs)))
        return specs

    def read_subsets(self, subsets: list) -> list[DatasetSpec]:
        if self.d.train_data_dir or self.d.reg_data_dir:
            self.warnings.append(f"{self.path}: [[subsets]] are given, so train_data_dir / "
                                 "reg_data_dir are ignored (as with dataset_config)")
        subs = []
        for j, raw in enumerate(subsets, start=1):
            raw = dict(raw) if isinstance(raw, dict) else raw
            name = raw.pop("name", None) if isinstance(raw, dict) else None
            where = f"[[subsets]] #{j}" + (f" ({name})" if name else "")
            spec = self._subset(where, [self._table(raw, where, SUBSET_KEYS + SUBSET_ONLY_KEYS)])
            if spec is not None:
                subs.append(spec)
        options = self._dataset_options("[[subsets]]", [])
        if options is None or not subs:
            return []
        return [DatasetSpec(f"{self.path.name} [[subsets]]", options, tuple(subs))]

    def _table(self, raw: Any, where: str, allowed: tuple[str, ...]) -> dict:
        """The typed keys of one table; unknown keys and bad values become problems."""
        if not isinstance(raw, dict):
            self.problems.append(f"{self.path}: {where}: expected a table, got {raw!r}")
            return {}
        out = {}
        for key, value in raw.items():
            if key == "subsets" and "subsets" in allowed:
                out[key] = value
                continue
            loc = f"{self.path}: {where} {key}"
            if key not in allowed:
                self.problems.append(f"{loc}: {self._unknown(key, allowed)}")
                continue
            typed = self._convert(key, value, loc)
            if typed is not _BAD:
                out[key] = typed
        return out

    def _unknown(self, key: str, allowed: tuple[str, ...]) -> str:
        if key in SUBSET_ONLY_KEYS:
            return "belongs in a [[datasets.subsets]] entry"
        if key in DATASET_KEYS + SUBSET_KEYS:
            return "not allowed here"
        if key in self.schema_fields or key == "train_batch_size":
            hint = " (write batch_size here)" if key == "train_batch_size" else ""
            return (f"a main-config key, not a dataset_config key{hint}; set it in the "
                    "--config_file [dataset] section or on the command line")
        return "unknown key" + _suggest(key, allowed)

    def _convert(self, key: str, value: Any, loc: str) -> Any:
        name = _SCHEMA_NAME.get(key, key)
        f = self.schema_fields.get(name)
        type_str = f.type if f is not None else _OWN_TYPES[key]
        try:
            if type_str == "list":
                if not isinstance(value, list) or len(value) != 2:
                    raise ValueError(f"expected two numbers, got {value!r}")
                typed = [values.to_float(v) for v in value]
            else:
                typed = values.convert(type_str, value)
        except ValueError as e:
            self.problems.append(f"{loc}: {e}")
            return _BAD
        problem = check_field(f, typed) if f is not None else None
        if key == "num_repeats" and typed < 1:
            problem = f"value {typed} out of range; it must be >= 1"
        if key in _UNSUPPORTED and typed != _UNSUPPORTED[key][0]:
            problem = _UNSUPPORTED[key][1]
        if problem:
            self.problems.append(f"{loc}: {problem}")
            return _BAD
        return typed

    # ---- resolving one subset / one dataset through the levels -----------------------
    def _pick(self, key: str, levels: list[dict], default: Any) -> Any:
        name = _SCHEMA_NAME.get(key, key)
        if name in self.cli:  # a [training] key given on the command line: None = use it
            return getattr(self.d, name, None)
        for level in levels:
            if key in level:
                return level[key]
        return default

    def _subset(self, where: str, levels: list[dict]) -> SubsetSpec | None:
        opts = SubsetOptions(**{f.name: self._pick(f.name, levels, getattr(self.d, f.name))
                                for f in fields(SubsetOptions)})
        sub = levels[0]
        image_dir = self._path(sub.get("image_dir"), where, "image_dir", folder=True)
        meta = self._path(sub.get("metadata_file"), where, "metadata_file", folder=False)
        masks = self._path(sub.get("conditioning_data_dir"), where, "conditioning_data_dir",
                           folder=True)
        if "conditioning_data_dir" in sub and not self.d.masked_loss:
            # kohya's train_network reads conditioning_data_dir only with --masked_loss
            self.problems.append(f"{self.path}: {where} conditioning_data_dir: mask images "
                                 "are used only with masked_loss = true (set it in the main "
                                 "config), or remove the key")
        if "image_dir" not in sub and "metadata_file" not in sub:
            self.problems.append(f"{self.path}: {where}: needs image_dir (a folder of images) "
                                 "or metadata_file (kohya fine-tuning JSON)")
        if image_dir is None and "image_dir" in sub or meta is None and "metadata_file" in sub:
            return None
        if image_dir is None and meta is None:
            return None
        for p in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            if not 0 <= getattr(opts, p) <= 1:
                self.problems.append(f"{self.path}: {where}: {p} = {getattr(opts, p)}: a "
                                     "probability must be between 0 and 1")
        ext = self._pick("caption_extension", levels, self.d.caption_extension)
        return SubsetSpec(
            where, image_dir, meta, self._pick("num_repeats", levels, 1),
            bool(sub.get("is_reg", False)), self._pick("class_tokens", levels, None),
            ext if ext.startswith(".") else "." + ext, opts, masks)

    def _path(self, value: str | None, where: str, key: str, folder: bool) -> Path | None:
        if value is None:
            return None
        p = Path(value).expanduser()
        beside = self.path.parent / p
        for cand in (p, beside):
            if cand.is_dir() if folder else cand.is_file():
                return cand
        what = "folder" if folder else "file"
        self.problems.append(f"{self.path}: {where} {key}: {what} {value!r} not found "
                             f"(looked in the working directory and beside {self.path.name})")
        return None

    def _dataset_options(self, where: str, levels: list[dict]) -> DataOptions | None:
        res = self._pick("resolution", levels, self.d.resolution) or self.default_res
        o = DataOptions(
            resolution=tuple(res), batch_size=self._pick("batch_size", levels,
                                                         self.d.train_batch_size),
            **{k: self._pick(k, levels, getattr(self.d, k)) for k in (
                "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
                "bucket_no_upscale")},
            prior_loss_weight=self.d.prior_loss_weight,
            network_multiplier=self._pick("network_multiplier", levels, 1.0),
            validation_split=self._pick("validation_split", levels, None),
            validation_seed=self._pick("validation_seed", levels, None))
        errors = dataset_option_errors(o)
        self.problems += [f"{self.path}: {where}: {e}" for e in errors]
        return None if errors else o


def dataset_option_errors(o: DataOptions) -> list[str]:
    """Problems with one dataset's resolution and bucket settings."""
    step = o.bucket_reso_steps if o.enable_bucket else 8
    errors = [f"resolution {o.resolution[0]}x{o.resolution[1]}: {side} is not a positive "
              f"multiple of {step}" for side in o.resolution if side <= 0 or side % step][:1]
    if o.validation_split is not None and not 0 <= o.validation_split < 1:
        errors.append(f"validation_split = {o.validation_split}: a fraction in [0, 1)")
    if o.enable_bucket and not errors:
        lo = o.min_bucket_reso or B.default_min_bucket_reso(o.resolution, step)
        hi = o.max_bucket_reso or B.default_max_bucket_reso(o.resolution, step)
        errors += B.bucket_settings_errors(o.resolution, lo, hi, step)
    return errors


class _Bad:
    pass


_BAD = _Bad()


def _suggest(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""
