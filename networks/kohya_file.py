"""Reading and writing LoRA .safetensors files: atomic writes and the A1111 hashes.

`sshs_model_hash` is the sha256 of the tensor data (everything after the header) and
`sshs_legacy_hash` the first 8 hex digits of the sha256 of the 64 KiB at offset 1 MiB, both
computed over the file as it would be written with only the `ss_*` metadata, which is what
A1111's additional-networks extension compares.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save

from library.durable import atomic_write_bytes  # noqa: F401 (re-exported)


def model_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    data = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_len:]).hexdigest()
    legacy = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy


def write_lora(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    metadata = {str(k): str(v) for k, v in metadata.items()}
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = model_hashes(tensors, metadata)
    atomic_write_bytes(path, save(tensors, metadata))


def read_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata); ValueError for a file safetensors cannot read (torn, empty,
    damaged header)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
        return load_file(str(path)), metadata
    except Exception as e:  # SafetensorError and OSError carry no file name
        raise ValueError(f"not a readable .safetensors file ({e}); it may be truncated or "
                         "damaged") from None
