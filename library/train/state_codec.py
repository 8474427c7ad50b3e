"""Nested Python state (optimizer / scheduler / scaler state dicts, RNG states) as JSON plus
tensors, so a training state never needs pickle.

`encode(obj)` returns (a JSON-able structure, {key: tensor}); `decode` inverts it exactly:
tensors are stored bit for bit (safetensors), floats by their shortest exact repr, numpy
arrays as their raw bytes. Values JSON cannot say directly are tagged one-key objects:
`{"__tensor__": key}`, `{"__tuple__": [...]}`, `{"__dict__": [[k, v], ...]}` (keys that are
not strings, as in an optimizer's per-parameter state), `{"__float__": "inf"}`,
`{"__ndarray__": key, "dtype": ..., "shape": [...]}`, `{"__np__": dtype, "v": value}`,
`{"__dtype__": "float32"}`. Any other type is refused (TypeError naming it): nothing is
ever turned back into an arbitrary object.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

_TAGS = ("__tensor__", "__tuple__", "__dict__", "__float__", "__ndarray__", "__np__",
         "__dtype__")


def encode(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}  # one tensor referenced twice (bitsandbytes' shared qmaps)

    def enc(x: Any, where: str) -> Any:
        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, int) and not isinstance(x, bool):
            return x
        if isinstance(x, float):
            return x if math.isfinite(x) else {"__float__": repr(x)}
        if isinstance(x, torch.Tensor):
            if id(x) not in seen:
                seen[id(x)] = key = str(len(tensors))
                # a copy: safetensors refuses tensors that share memory (views of one buffer)
                tensors[key] = x.detach().to("cpu", copy=True).contiguous()
            return {"__tensor__": seen[id(x)]}
        if isinstance(x, np.ndarray):
            key = str(len(tensors))
            tensors[key] = torch.from_numpy(np.ascontiguousarray(x).reshape(-1).view(np.uint8)
                                            .copy())
            return {"__ndarray__": key, "dtype": x.dtype.str, "shape": list(x.shape)}
        if isinstance(x, np.generic):
            return {"__np__": x.dtype.str, "v": enc(x.item(), where)}
        if isinstance(x, torch.dtype):
            return {"__dtype__": str(x).removeprefix("torch.")}
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, f"{where}[{i}]") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{where}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: enc(v, f"{where}.{k}") for k, v in x.items()}
            return {"__dict__": [[enc(k, where), enc(v, f"{where}[{k!r}]")]
                                 for k, v in x.items()]}
        raise TypeError(f"{where}: a {type(x).__name__} cannot be stored in a training state")

    return enc(obj, "state"), tensors


def decode(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(data, list):
        return [decode(v, tensors) for v in data]
    if not isinstance(data, dict):
        return data
    tag = next((t for t in _TAGS if t in data), None)  # plain dicts never have __ keys
    if tag == "__tensor__":
        return tensors[data["__tensor__"]]
    if tag == "__tuple__":
        return tuple(decode(v, tensors) for v in data["__tuple__"])
    if tag == "__dict__":
        return {_hashable(decode(k, tensors)): decode(v, tensors) for k, v in data["__dict__"]}
    if tag == "__float__":
        return float(data["__float__"])
    if tag == "__ndarray__":
        raw = tensors[data["__ndarray__"]].numpy().tobytes()
        return np.frombuffer(raw, dtype=np.dtype(data["dtype"])).reshape(data["shape"]).copy()
    if tag == "__np__":
        return np.dtype(data["__np__"]).type(decode(data["v"], tensors))
    if tag == "__dtype__":
        return getattr(torch, data["__dtype__"])
    return {k: decode(v, tensors) for k, v in data.items()}


def _hashable(k: Any) -> Any:
    return tuple(_hashable(v) for v in k) if isinstance(k, list) else k
