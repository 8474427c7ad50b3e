"""Training state for exact resume: LoRA weights (fp32), optimizer, scheduler, RNG, position.

A state folder holds only data, never pickle, so one can be resumed from as safely as a
.safetensors file is loaded:

  lora.safetensors      the LoRA's fp32 master weights (kohya keys)
  training.safetensors  every tensor of the optimizer / scheduler / grad-scaler state dicts
                        and the RNG states (torch, CUDA, generators as byte tensors)
  training.json         the rest of those state dicts, tensors referenced by key
                        (library/train/state_codec.py)
  extra.safetensors     `extra_tensors` of the caller (only when given), e.g. EMA weights
  state.json            step, epoch, batches done in the epoch, seed, config fingerprint and
                        the fingerprinted config
  manifest.json         size and sha256 of every file above; written last

The folder is written under a temporary name (library/durable.py) and renamed into place,
so a crash leaves the old state or the new one, never a mix; `load_state` checks every file
against the manifest first, so a torn or altered folder is refused with what to do. A
`training.pt` folder (older tomlora versions, a pickle) is refused without being opened.
"""
from __future__ import annotations

import glob
import hashlib
import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_tensors, save as save_tensors

from library.durable import atomic_write_bytes, fsync_dir, save_point, tmp_path
from library.train.state_codec import decode, encode

STATE_VERSION = 2
FILES = ("lora.safetensors", "training.safetensors", "training.json", "extra.safetensors",
         "state.json")


@dataclass(frozen=True)
class Position:
    step: int            # optimizer steps done
    epoch: int           # 0-based epoch the next batch belongs to
    batches_done: int    # batches of that epoch already consumed
    seed: int


class StateError(Exception):
    """A state folder that cannot be resumed from."""


def start_position(training, seed: int, steps_per_epoch: int, accum: int,
                   total_steps: int) -> Position | None:
    """Where `initial_step` / `initial_epoch` start the run (None: not set). The step count
    starts at N; the data at the start of N's epoch, or with `skip_until_initial_step` right
    after step N's batches. ValueError when N leaves nothing to train."""
    n = training.initial_step
    if n is None and training.initial_epoch is not None:
        n = (training.initial_epoch - 1) * steps_per_epoch
    if n is None:
        return None
    if n >= total_steps:
        key = "initial_step" if training.initial_step is not None else "initial_epoch"
        raise ValueError(f"{key}: starts at step {n}, but the run has {total_steps} steps; "
                         "raise max_train_steps / max_train_epochs or start earlier")
    epoch, within = divmod(n, steps_per_epoch)
    return Position(n, epoch, within * accum if training.skip_until_initial_step else 0, seed)


def rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(),
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_state(folder: Path, *, network, optimizer, lr_scheduler, scaler, position: Position,
               fingerprint: str, generators: dict | None = None, config: dict | None = None,
               extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a state folder (see the module docstring). `config` (the fingerprinted keys)
    lets a changed resume name the keys that differ. `extra_tensors` ({name: tensor}, e.g. a
    feature's EMA weights) are stored bit for bit in extra.safetensors and restored by
    `load_state(..., extra_tensors=...)`."""
    folder = Path(folder)
    blob, tensors = encode({
        "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None, "rng": rng_states(),
        "generators": {k: g.get_state() for k, g in (generators or {}).items()}})
    files = {
        # raw: LyCORIS's use_scalar kept apart from the weights, so a resume is exact
        "lora.safetensors": save_tensors(network.kohya_state_dict(torch.float32, raw=True)),
        "training.safetensors": save_tensors(tensors),
        "training.json": json.dumps(blob).encode(),
        "state.json": json.dumps({"version": STATE_VERSION, **asdict(position),
                                  "config_fingerprint": fingerprint,
                                  **({"config": config} if config is not None else {})},
                                 indent=1).encode()}
    if extra_tensors:
        files["extra.safetensors"] = save_tensors(
            {k: v.detach().cpu().contiguous() for k, v in extra_tensors.items()})
    manifest = {"format": "tomlora-state", "version": STATE_VERSION, "files": {
        name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for name, data in files.items()}}
    files["manifest.json"] = json.dumps(manifest, indent=1).encode()
    tmp = tmp_path(folder)
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        for name, data in files.items():  # manifest.json last: its presence marks completion
            atomic_write_bytes(tmp / name, data)
        _swap_in(tmp, folder)
    except OSError as e:  # a full disk: leave no half-written folder; name the state
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(e.errno, e.strerror, str(folder)) from None
    except BaseException:  # a second Ctrl-C: the same
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _swap_in(tmp: Path, folder: Path) -> None:
    """Rename `tmp` to `folder`, replacing an older state of the same name. Between the two
    renames the old one lives under a temporary `-old` name, which the next run's
    `library.durable.remove_leftovers` puts back if `folder` is missing."""
    old = tmp_path(folder.with_name(folder.name + "-old"))
    if folder.exists():
        if old.exists():
            shutil.rmtree(old)
        folder.rename(old)
        save_point(f"{folder} (old state moved aside)")
    tmp.rename(folder)
    fsync_dir(folder.parent)
    save_point(f"{folder} (renamed into place)")
    if old.exists():
        shutil.rmtree(old)


def _read_json(path: Path, folder: Path):
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError) as e:
        raise StateError(f"resume: {path} is damaged ({e}); resume from another state folder"
                         ) from None


def verify(folder: Path) -> dict[str, bytes]:
    """Every file of the state folder, checked against manifest.json: {name: bytes}."""
    folder = Path(folder)
    if not (folder / "manifest.json").is_file():
        if (folder / "training.pt").is_file():
            raise StateError(
                f"resume: {folder} was written by an older tomlora (training.pt, a pickle). It "
                "is not loaded: unpickling a file can run code. Start from its weights instead "
                f"with network_weights = \"{folder / 'lora.safetensors'}\" (the optimizer "
                "and schedule restart), or resume from a state written by this version")
        if (folder / "state.json").is_file():
            raise StateError(f"resume: {folder} is incomplete (no manifest.json; the save "
                             "was interrupted); resume from an earlier state folder")
        raise StateError(f"resume: {folder} is not a tomlora state folder (no state.json); "
                         "point resume at an <output_name>-state folder written with "
                         "save_state = true")
    manifest = _read_json(folder / "manifest.json", folder)
    if not isinstance(manifest, dict) or manifest.get("version") != STATE_VERSION or \
            not isinstance(manifest.get("files"), dict):
        raise StateError(f"resume: {folder / 'manifest.json'}: not a version {STATE_VERSION} "
                         "tomlora state manifest")
    out = {}
    for name, want in manifest["files"].items():
        if name not in FILES:
            raise StateError(f"resume: {folder / 'manifest.json'} lists an unknown file "
                             f"{name!r}; the folder was not written by tomlora")
        path = folder / name
        if not path.is_file():
            raise StateError(f"resume: {path} is missing; the state folder is incomplete, "
                             "resume from another one")
        data = path.read_bytes()
        if len(data) != want.get("size") or hashlib.sha256(data).hexdigest() != \
                want.get("sha256"):
            raise StateError(f"resume: {path} is damaged ({len(data)} bytes, the manifest "
                             f"says {want.get('size')}; or its checksum differs): a torn "
                             "copy or an edited file; resume from another state folder")
        out[name] = data
    for name in ("state.json", "lora.safetensors", "training.safetensors", "training.json"):
        if name not in out:
            raise StateError(f"resume: {folder}: the manifest lacks {name}")
    return out


def _position(data: dict, folder: Path) -> tuple[Position, str]:
    try:
        return Position(int(data["step"]), int(data["epoch"]), int(data["batches_done"]),
                        int(data["seed"])), str(data.get("config_fingerprint", ""))
    except (KeyError, TypeError, ValueError):
        raise StateError(f"resume: {folder / 'state.json'} lacks the position (step, epoch, "
                         "batches_done, seed)") from None


def read_position(folder: Path) -> tuple[Position, str]:
    """The saved position and config fingerprint, after checking the whole folder."""
    folder = Path(folder)
    data = json.loads(verify(folder)["state.json"])
    return _position(data, folder)


def latest_state(out_dir: Path, name: str) -> tuple[Path | None, list[str]]:
    """The complete state folder of output_name `name` in `out_dir` with the most steps
    (resume = "latest"), and a note per incomplete or damaged one skipped."""
    best, notes = None, []
    for p in sorted(Path(out_dir).glob(f"{glob.escape(name)}-*state")) \
            if Path(out_dir).is_dir() else []:
        if not p.is_dir():
            continue
        try:
            pos, _ = read_position(p)
        except StateError as e:
            notes.append(f"skipped {p.name}: {str(e).removeprefix('resume: ')}")
            continue
        if best is None or (pos.step, p.stat().st_mtime) > best[0]:
            best = ((pos.step, p.stat().st_mtime), p)
    return (best[1] if best else None), notes


def resolve_resume(cfg):
    """`resume = "latest"` (the diffusers scripts' spelling) -> the newest complete state
    folder in output_dir, or no resume when there is none. Returns (config, notes)."""
    from dataclasses import replace
    if cfg.saving.resume != "latest":
        return cfg, []
    found, notes = latest_state(Path(cfg.saving.output_dir), cfg.saving.output_name)
    if found is None:
        notes.append(f"resume = \"latest\": no complete state folder of "
                     f"{cfg.saving.output_name!r} in {cfg.saving.output_dir}; starting a new "
                     "run")
    else:
        notes.append(f"resume = \"latest\": {found}")
    return replace(cfg, saving=replace(cfg.saving, resume=str(found) if found else None)), notes


def config_changes(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """`section.key: old -> new` for every key that differs between two config dicts."""
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k), current.get(k)
        if isinstance(a, dict) and isinstance(b, dict) and not prefix:
            out += config_changes(a, b, f"{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def resume_warning(folder: Path, fingerprint: str, config: dict | None = None) -> str | None:
    """A warning when the config fingerprint stored in the state differs from this run's
    (None when they match). Not an error: changing e.g. max_train_steps is legitimate, but
    the resumed run is then no exact continuation of the saved one."""
    folder = Path(folder)
    data = _read_json(folder / "state.json", folder)
    stored = data.get("config_fingerprint", "")
    if stored == fingerprint:
        return None
    changes = config_changes(data["config"], config) if isinstance(data.get("config"), dict) \
        and config is not None else []
    shown = "; ".join(changes[:8]) + (f"; ... ({len(changes) - 8} more)" if len(changes) > 8
                                      else "")
    what = f": {shown}" if changes else f" (fingerprint {stored or 'missing'} -> {fingerprint})"
    return (f"resume: the config changed since the state in {folder} was saved{what}; the "
            "resumed run is not an exact continuation of the saved run")


def load_state(folder: Path, *, network, optimizer, lr_scheduler, scaler,
               generators: dict | None = None,
               extra_tensors: dict[str, torch.Tensor] | None = None) -> Position:
    """Restore everything saved by `save_state`; call after the network and optimizer exist
    (so their construction's RNG draws are overwritten by the saved RNG state).

    `extra_tensors` ({name: tensor}) are filled in place with the saved values (names,
    shapes and dtypes must match what was saved; saved names not asked for are ignored).
    StateError names the folder and what to do."""
    folder = Path(folder)
    files = verify(folder)
    position, _ = _position(json.loads(files["state.json"]), folder)
    try:
        network.load_kohya_state_dict(load_tensors(files["lora.safetensors"]),
                                      source=str(folder / "lora.safetensors"))
    except ValueError as e:
        raise StateError(f"resume: {e}; the state was saved with another network "
                         "(network_dim, network_alpha, network_args or the trained parts "
                         "changed): use the config it was saved with") from None
    blob = decode(json.loads(files["training.json"]),
                  load_tensors(files["training.safetensors"]))
    try:
        optimizer.load_state_dict(blob["optimizer"])
        lr_scheduler.load_state_dict(blob["lr_scheduler"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise StateError(f"resume: {folder}: the optimizer state does not fit this run "
                         f"({e}); optimizer_type or the parameter groups changed: use the "
                         "config the state was saved with") from None
    if scaler is not None and blob.get("scaler") is not None:
        scaler.load_state_dict(blob["scaler"])
    set_rng_states(blob["rng"])
    for name, g in (generators or {}).items():
        if name in blob.get("generators", {}):
            g.set_state(blob["generators"][name])
    if extra_tensors:
        saved = load_tensors(files["extra.safetensors"]) if "extra.safetensors" in files \
            else {}
        for name, t in extra_tensors.items():
            s = saved.get(name)
            if s is None or s.shape != t.shape or s.dtype != t.dtype:
                raise StateError(f"resume: {folder} has no saved tensor {name!r} of shape "
                                 f"{tuple(t.shape)} {t.dtype} (extra.safetensors); it was "
                                 "saved without this feature or with other settings")
            with torch.no_grad():
                t.copy_(s)
    return position


def read_extra_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The `extra_tensors` saved in a state folder (checked against its manifest)."""
    files = verify(Path(folder))
    return load_tensors(files["extra.safetensors"]) if "extra.safetensors" in files else {}
