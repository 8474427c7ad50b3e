"""The local Hugging Face cache, read without ever touching the network.

Users bring hub ids (`stabilityai/stable-diffusion-xl-base-1.0`) and the folders that
`snapshot_download(cache_dir=...)` writes (`models--org--name/snapshots/<rev>/`). Both resolve
to a snapshot folder here; nothing is downloaded during training.
"""
from __future__ import annotations

import os
from pathlib import Path


def hub_cache_dir() -> str | None:
    """The hub cache folder from the environment, read at call time.

    huggingface_hub reads HF_HUB_CACHE / HF_HOME once at import; reading them here as well
    means a changed environment (a test, a notebook cell) is honoured. None: the library's
    default (~/.cache/huggingface/hub).
    """
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.environ[var]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def looks_like_hub_id(text: str) -> bool:
    """`org/name`, not a relative or absolute path."""
    parts = text.split("/")
    return (len(parts) == 2 and all(parts) and not text.startswith((".", "~"))
            and "\\" not in text and not text.endswith((".safetensors", ".ckpt")))


def cached_snapshot(repo_id: str) -> Path | None:
    """The snapshot folder of `repo_id` in the local cache, or None when it is not there."""
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, local_files_only=True,
                                      cache_dir=hub_cache_dir()))
    except Exception:  # not cached, no ref, an invalid id: all mean "not available offline"
        return None


def snapshot_in_cache_folder(folder: Path, marker: str = "model_index.json") -> Path | None:
    """The snapshot inside a `models--org--name` folder (or a cache_dir holding one).

    The revision `refs/main` points at wins; otherwise the most recently written snapshot
    that has `marker`.
    """
    repos = [folder] if (folder / "snapshots").is_dir() else \
        sorted(p for p in folder.glob("models--*") if (p / "snapshots").is_dir())
    for repo in repos:
        ref = repo / "refs" / "main"
        if ref.is_file():
            snap = repo / "snapshots" / ref.read_text().strip()
            if (snap / marker).is_file():
                return snap
        snaps = sorted((p.parent for p in (repo / "snapshots").glob(f"*/{marker}")),
                       key=lambda p: p.stat().st_mtime)
        if snaps:
            return snaps[-1]
    return None


def download_hint(repo_id: str) -> str:
    return (f"download it once with `huggingface-cli download {repo_id}` (or "
            f"`python -c \"from huggingface_hub import snapshot_download; "
            f"snapshot_download('{repo_id}')\"`), then run again or pass the folder path")


def sibling_cache_path(path: Path) -> Path | None:
    """A missing `DIR/NAME[/rest]` found as `DIR/models--ORG--NAME/snapshots/<rev>[/rest]`.

    `snapshot_download(repo_id="org/NAME", cache_dir="DIR")` writes the cache layout, while
    guides (seed 002) then point configs at `DIR/NAME/...`. Only an unambiguous match counts.
    """
    path = Path(path)
    parts = path.parts
    for i in range(len(parts) - 1, -1, -1):
        base = Path(*parts[:i]) if i else Path(".")
        if not base.is_dir():
            continue
        name, rest = parts[i], Path(*parts[i + 1:]) if i + 1 < len(parts) else None
        repos = [p for p in base.glob(f"models--*--{name}") if (p / "snapshots").is_dir()]
        if len(repos) != 1:
            return None
        snap = snapshot_in_cache_folder(repos[0], str(rest) if rest else "model_index.json")
        return (snap / rest if rest else snap) if snap is not None else None
    return None
