"""safetensors read tensor by tensor and written as a stream, so a 7 GB checkpoint never sits
in memory.

safetensors' own `safe_open` memory-maps the whole file: every tensor read stays resident in
the process (counted in its RSS) until the map closes. Here the header is parsed once and each
tensor is read with a plain `readinto` into its own buffer, which is freed when the caller
drops it. The writer takes the full list of (name, dtype, shape) up front, writes the header,
then the tensors in that order, one at a time, to a temporary file that is renamed at the end.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import NamedTuple

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class Entry(NamedTuple):
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int


class LazyFile:
    """The header of one .safetensors file; tensors are read on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                raw = fh.read(8)
                if len(raw) != 8:
                    raise ValueError("shorter than a safetensors header")
                n = struct.unpack("<Q", raw)[0]
                if n > _MAX_HEADER:
                    raise ValueError("header length is implausible")
                header = json.loads(fh.read(n))
            size = self.path.stat().st_size
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.path}: not a readable .safetensors file ({e})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.entries: dict[str, Entry] = {}
        for name, info in header.items():
            dtype = DTYPES.get(info.get("dtype"))
            start, end = info.get("data_offsets", (0, 0))
            if dtype is None or 8 + n + end > size:
                raise ValueError(f"{self.path}: tensor {name!r} has dtype {info.get('dtype')} "
                                 "or lies past the end of the file (truncated download?)")
            self.entries[name] = Entry(dtype, tuple(info["shape"]), 8 + n + start, 8 + n + end)

    def keys(self):
        return self.entries.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def read(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        buf = bytearray(e.end - e.start)
        with open(self.path, "rb") as fh:
            fh.seek(e.start)
            fh.readinto(buf)
        if not buf:
            return torch.empty(e.shape, dtype=e.dtype)
        return torch.frombuffer(buf, dtype=e.dtype).reshape(e.shape)


def nbytes(dtype: torch.dtype, shape) -> int:
    return math.prod(shape) * torch.tensor([], dtype=dtype).element_size()


class StreamWriter:
    """Write tensors in a fixed order; `close()` renames the file into place.

        with StreamWriter(path, [(name, dtype, shape), ...], metadata) as w:
            for name, ... : w.write(name, tensor)
    """

    def __init__(self, path: str | Path, layout: list[tuple[str, torch.dtype, tuple]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        header: dict = {"__metadata__": {str(k): str(v) for k, v in (metadata or {}).items()}}
        offset = 0
        self._order = []
        for name, dtype, shape in layout:
            size = nbytes(dtype, shape)
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            self._order.append((name, dtype, tuple(shape)))
            offset += size
        if not header["__metadata__"]:
            del header["__metadata__"]
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._fh = open(self.tmp, "wb")
        self._fh.write(struct.pack("<Q", len(blob)) + blob)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want, dtype, shape = self._order[self._next]
        if name != want or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: expected {want} {dtype} {shape}, got {name} "
                             f"{tensor.dtype} {tuple(tensor.shape)}")
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            self._fh.write(t.view(torch.uint8).numpy().tobytes() if t.dim() else
                           t.reshape(1).view(torch.uint8).numpy().tobytes())
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            self.abort()
            raise ValueError(f"{self.path}: only {self._next} of {len(self._order)} tensors "
                             "were written")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False
