"""Classes named by an importable path in the config, as sd-scripts resolves them.

`optimizer_type = "LoraEasyCustomOptimizer.came.CAME"` imports the module
`LoraEasyCustomOptimizer.came` and takes its class `CAME`; a bare name (no dot) is looked up
in a default module (`torch.optim` for optimizers, `torch.optim.lr_scheduler` for
`lr_scheduler_type`). The `*_args` values become keyword arguments: a string is read as a
Python literal where it is one (`"0.9,0.999"` -> (0.9, 0.999), as sd-scripts'
`ast.literal_eval`), anything else is passed as given.
"""
from __future__ import annotations

import ast
import importlib
import inspect
from typing import Any


def import_class(path: str, default_module: str, key: str):
    """The class `path` names; ValueError with a one-line reason naming `key` otherwise."""
    module_name, _, attr = path.rpartition(".")
    module_name = module_name or default_module
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:  # ModuleNotFoundError included
        raise ValueError(f"{key} {path!r}: cannot import module {module_name!r} ({e}); "
                         "install the package that provides it or correct the path") from None
    except Exception as e:  # a broken package fails at import with its own error
        raise ValueError(f"{key} {path!r}: importing {module_name!r} failed: "
                         f"{type(e).__name__}: {e}") from None
    cls = getattr(module, attr, None)
    if cls is None or not callable(cls):
        raise ValueError(f"{key} {path!r}: module {module_name!r} has no class {attr!r}")
    return cls


def literal(v: Any) -> Any:
    """A string that is a Python literal becomes its value; everything else is kept."""
    if isinstance(v, str):
        try:
            return ast.literal_eval(v.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return v
    return v


def keyword_problems(cls, kwargs: dict, key: str, skip: tuple[str, ...]) -> list[str]:
    """Arguments the class's constructor does not take (none when it takes **kwargs or its
    signature cannot be read). `skip` are the ones the trainer passes itself."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    accepted = [n for n, p in params.items() if n not in skip and p.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    name = f"{cls.__module__}.{cls.__qualname__}"
    return [f"{key}: {k!r} is set by the trainer, not by {key}" if k in skip else
            f"{key}: {k!r} is not an argument of {name}; accepted: "
            f"{', '.join(accepted) or 'none'}" for k in kwargs if k not in accepted]
