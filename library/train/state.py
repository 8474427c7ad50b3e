"""Training state for exact resume: LoRA weights (fp32), optimizer, scheduler, RNG, position.

A state folder holds `lora.safetensors` (fp32 master weights, kohya keys), `training.pt`
(optimizer / scheduler / grad-scaler state dicts and RNG states, loaded with
`weights_only=False` only from folders we wrote), `state.json` (step, epoch, batches done
in the epoch, seed, config fingerprint and the fingerprinted config) and, when the run has
any, `extra.safetensors`: named tensors of other parts of the run (the EMA of the LoRA
weights), read back with `read_extra_tensors`. It is written to a temporary sibling and swapped in
by rename, so a crash leaves either the old state or the new one, never a mix.
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE_VERSION = 1
EXTRA_FILE = "extra.safetensors"


@dataclass(frozen=True)
class Position:
    step: int            # optimizer steps done
    epoch: int           # 0-based epoch the next batch belongs to
    batches_done: int    # batches of that epoch already consumed
    seed: int


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
               fingerprint: str, generators: dict | None = None,
               config: dict | None = None,
               extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """`config` (the fingerprinted keys) lets a changed resume name the keys that differ;
    `extra_tensors` are saved as they are (fp32 stays fp32) in extra.safetensors."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(network.kohya_state_dict(torch.float32), str(tmp / "lora.safetensors"))
    if extra_tensors:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in extra_tensors.items()},
                  str(tmp / EXTRA_FILE))
    torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rng_states(),
                "generators": {k: g.get_state() for k, g in (generators or {}).items()}},
               tmp / "training.pt")
    (tmp / "state.json").write_text(json.dumps(
        {"version": STATE_VERSION, **asdict(position), "config_fingerprint": fingerprint,
         **({"config": config} if config is not None else {})}, indent=1))
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        if old.exists():
            shutil.rmtree(old)
        folder.rename(old)
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)
    return folder


class StateError(Exception):
    """A state folder that cannot be resumed from."""


def read_position(folder: Path) -> tuple[Position, str]:
    folder = Path(folder)
    meta = folder / "state.json"
    if not meta.is_file():
        raise StateError(f"resume: {folder} is not a tomlora state folder (no state.json); "
                         "point resume at an <output_name>-state folder written with "
                         "save_state = true")
    data = json.loads(meta.read_text())
    if data.get("version") != STATE_VERSION:
        raise StateError(f"resume: {meta}: state version {data.get('version')} is not "
                         f"{STATE_VERSION}")
    return Position(data["step"], data["epoch"], data["batches_done"], data["seed"]), \
        data.get("config_fingerprint", "")


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
    data = json.loads((folder / "state.json").read_text())
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
               generators: dict | None = None) -> Position:
    """Restore everything saved by `save_state`; call after the network and optimizer exist
    (so their construction's RNG draws are overwritten by the saved RNG state)."""
    folder = Path(folder)
    position, _ = read_position(folder)
    network.load_kohya_state_dict(load_file(str(folder / "lora.safetensors")),
                                  source=str(folder / "lora.safetensors"))
    blob = torch.load(folder / "training.pt", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    lr_scheduler.load_state_dict(blob["lr_scheduler"])
    if scaler is not None and blob.get("scaler") is not None:
        scaler.load_state_dict(blob["scaler"])
    set_rng_states(blob["rng"])
    for name, g in (generators or {}).items():
        if name in blob.get("generators", {}):
            g.set_state(blob["generators"][name])
    return position


def read_extra_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The `extra_tensors` a state was saved with (empty when it had none)."""
    path = Path(folder) / EXTRA_FILE
    return load_file(str(path)) if path.is_file() else {}
