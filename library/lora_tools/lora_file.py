"""Any LoRA file as per-module deltas: `read_modules(path)` -> {stem: Module}.

Keys are grouped by module stem (the text before the first '.', kohya style); diffusers/peft
files are turned into kohya keys first (networks.formats), keeping alphas stored in
`tomlora_alphas`. Each module's tensors go to the algorithm whose marker suffix they carry:

    ALGORITHMS = [Algorithm("LoRA", ("lora_down.weight",), lora_delta), ...]

A plain LoRA (and LoCon: the same keys on convs) has factors, so exact merges and cheap
resizes use them. The LyCORIS algorithms (LoHa, LoKr, DoRA, Tucker LoCon, full, (IA)3) give
their full fp32 delta through our own adapters' math (`adapter_delta`, networks.adapters);
DoRA and (IA)3 need the base weight, so only merging into a model takes them. Others plug in
with `register(name, markers, delta_fn)`, `delta_fn(tensors, base_weight)`; a file of an
algorithm without one (OFT/BOFT) stops with "OFT/BOFT file: not supported by this tool yet".
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from networks import formats, layouts
from networks.adapters import delta_from_tensors, group_by_module
from networks.from_file import detect_layout

DeltaFn = Callable[[Mapping[str, torch.Tensor], "torch.Tensor | None"], torch.Tensor]


@dataclass
class Algorithm:
    name: str
    markers: tuple[str, ...]  # a module holding a tensor with one of these suffixes is ours
    delta: DeltaFn | None  # None: recognised, not supported yet
    takes_shape: bool = False  # delta(tensors, base_weight, shape): the module's weight shape


def lora_delta(t: Mapping[str, torch.Tensor], base_weight: torch.Tensor | None = None
               ) -> torch.Tensor:
    """(alpha / rank) * up @ down in fp32, shaped like the base weight (Linear or Conv2d)."""
    down, up = t["lora_down.weight"].float(), t["lora_up.weight"].float()
    rank = down.shape[0]
    alpha = float(t["alpha"].float()) if "alpha" in t else float(rank)
    delta = (up.flatten(1) @ down.flatten(1)) * (alpha / rank)
    return delta.reshape(up.shape[0], *down.shape[1:])


def _unsupported(name: str) -> DeltaFn:
    def fail(t, base_weight=None):
        raise ValueError(f"{name} file: not supported by this tool yet")
    return fail


def adapter_delta(t: Mapping[str, torch.Tensor], base_weight: torch.Tensor | None = None,
                  shape: tuple | None = None) -> torch.Tensor:
    """A LyCORIS module's delta through our own adapters' math (networks.adapters), shaped
    like the base weight (given, else the shape the file's tensors and the module's name
    imply, see `Module.shape`)."""
    if base_weight is not None:
        shape = tuple(base_weight.shape)
    if shape is None:
        raise ValueError("cannot tell the module's weight shape without the model")
    return delta_from_tensors(t, shape, base_weight)


ALGORITHMS: list[Algorithm] = [
    Algorithm("LoRA", ("lora_down.weight", "lora_up.weight"), lora_delta),
    # before LoRA: DoRA and Tucker modules carry lora_* too
    Algorithm("DoRA", ("dora_scale",), adapter_delta, True),
    Algorithm("LoHa", ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), adapter_delta, True),
    Algorithm("LoKr", ("lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a"), adapter_delta, True),
    Algorithm("LoCon (Tucker)", ("lora_mid.weight",), adapter_delta, True),
    Algorithm("full/diff", ("diff", "diff_b"), adapter_delta, True),
    Algorithm("IA3", ("on_input",), adapter_delta, True),
    Algorithm("OFT/BOFT", ("oft_blocks", "oft_diag"), None),
]


def register(name: str, markers: tuple[str, ...], delta: DeltaFn) -> None:
    """Plug in (or replace) an algorithm's delta function; markers are tensor-name suffixes."""
    for a in ALGORITHMS:
        if a.name == name:
            a.markers, a.delta = markers, delta
            return
    ALGORITHMS.insert(0, Algorithm(name, markers, delta))


def _priority(a: Algorithm) -> int:
    return 1 if a.name == "LoRA" else 0  # LoRA keys appear inside DoRA/Tucker modules


def algorithm_of(suffixes) -> Algorithm | None:
    for a in sorted(ALGORITHMS, key=_priority):
        if any(s in a.markers or s.endswith(tuple("." + m for m in a.markers))
               for s in suffixes):
            return a
    return None


@dataclass
class Module:
    """One module of a LoRA file: its tensors by suffix ('lora_down.weight', 'alpha', ...)."""
    stem: str
    tensors: dict[str, torch.Tensor]
    algorithm: Algorithm
    source: str = ""  # the file, for error messages
    shape: tuple | None = None  # non-LoRA modules: the base weight's shape, where it can be told

    @property
    def is_lora(self) -> bool:
        return self.algorithm.name == "LoRA"

    @property
    def rank(self) -> int:
        return int(self.tensors["lora_down.weight"].shape[0])

    @property
    def alpha(self) -> float:
        a = self.tensors.get("alpha")
        return float(a.float()) if a is not None else float(self.rank)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def down(self) -> torch.Tensor:
        return self.tensors["lora_down.weight"]

    @property
    def up(self) -> torch.Tensor:
        return self.tensors["lora_up.weight"]

    @property
    def is_conv3x3(self) -> bool:
        d = self.tensors.get("lora_down.weight")
        return d is not None and d.dim() == 4 and tuple(d.shape[2:]) != (1, 1)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return (self.up.shape[0], *self.down.shape[1:])

    def delta(self, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """The full fp32 delta of this module (scale included); a ValueError names the file
        and the module. `base_weight` (fp32) is given where the tool has the model (DoRA
        needs it)."""
        where = f"{self.source}: module {self.stem}"
        if self.algorithm.delta is None:
            raise ValueError(f"{where}: {self.algorithm.name} file: not supported by this "
                             "tool yet (plain LoRA and LoCon files are)")
        try:
            delta = self.algorithm.delta(self.tensors, base_weight, self.shape) \
                if self.algorithm.takes_shape else self.algorithm.delta(self.tensors, base_weight)
        except (ValueError, KeyError, RuntimeError) as e:
            raise ValueError(f"{where}: {self.algorithm.name}: {e}") from None
        if base_weight is not None and delta.numel() != base_weight.numel():
            raise ValueError(f"{where}: its delta has {list(delta.shape)} but the model's "
                             f"weight is {list(base_weight.shape)} (a LoRA for another model?)")
        return delta.float()


def _check_lora_module(stem: str, t: dict) -> None:
    down, up = t.get("lora_down.weight"), t.get("lora_up.weight")
    if down is None or up is None:
        raise ValueError(f"module {stem}: has {'lora_up' if down is None else 'lora_down'} "
                         "but not the other")
    if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != down.shape[0] \
            or (up.dim() == 4 and tuple(up.shape[2:]) != (1, 1)):
        raise ValueError(f"module {stem}: lora_up {list(up.shape)} does not fit lora_down "
                         f"{list(down.shape)}")
    a = t.get("alpha")
    if a is not None and (a.numel() != 1 or not float(a.float().reshape(())) > 0):
        raise ValueError(f"module {stem}: alpha {a.tolist()} is not one number > 0")
    if a is not None:
        t["alpha"] = a.reshape(())


def to_kohya(sd: dict[str, torch.Tensor], meta: Mapping[str, str], family: str | None,
             unet_config: Mapping | None) -> dict[str, torch.Tensor]:
    """kohya keys whatever the layout (peft -> kohya needs the family and UNet layout)."""
    try:
        layout = detect_layout(sd)
    except ValueError as e:
        if "unsupported LoRA variant" in str(e):
            return sd  # LyCORIS keys are kohya-style stems; the registry names the algorithm
        raise ValueError(f"not a LoRA file: {e}") from None
    if layout == "kohya":
        return sd
    fam = family or layouts.family_of(sd, meta)
    if fam is None:
        raise ValueError("cannot tell whether this diffusers-layout LoRA is for SD1.5 or "
                         "SDXL; pass --family sd15|sdxl")
    config = layouts.STANDARD_UNET[fam]
    alphas = None
    if meta.get("tomlora_alphas"):
        alphas = json.loads(meta["tomlora_alphas"])
    return formats.peft_to_kohya(sd, fam, unet_config or config, alpha=alphas)


def weight_shape(stem: str, tensors: Mapping[str, torch.Tensor], linear_proj: bool
                 ) -> tuple | None:
    """A LyCORIS module's base weight shape from its tensors and name (None: only the model
    can tell, e.g. (IA)3)."""
    from networks.export import implied_shape, stock_shape
    try:
        return stock_shape(stem, implied_shape(tensors), linear_proj)
    except ValueError:
        return None


def read_modules(path: str | Path, *, family: str | None = None,
                 unet_config: Mapping | None = None
                 ) -> tuple[dict[str, Module], dict[str, str]]:
    """({stem: Module}, metadata) of a LoRA file. ValueError naming the file and the module."""
    from library.lora_tools.st_io import LazyFile
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: not found")
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: only .safetensors LoRA files are read (a {path.suffix} file "
                         "is a pickle that can run code; convert it with a tool you trust)")
    lazy = LazyFile(path)
    sd = {k: lazy.read(k) for k in lazy.keys()}
    try:
        sd = to_kohya(sd, lazy.metadata, family, unet_config)
        linear_proj = bool((unet_config or {}).get(
            "use_linear_projection", (family or layouts.family_of(sd, lazy.metadata)) == "sdxl"))
        modules = {}
        for stem, tensors in sorted(group_by_module(sd).items()):
            algo = algorithm_of(tensors)
            if algo is None:
                raise ValueError(f"not a LoRA file: tensor {stem}.{next(iter(tensors))} "
                                 "belongs to no known LoRA algorithm (is it a model "
                                 "checkpoint?)")
            if algo.name == "LoRA":
                _check_lora_module(stem, tensors)
            modules[stem] = Module(stem, tensors, algo, str(path),
                                   None if algo.name == "LoRA" else
                                   weight_shape(stem, tensors, linear_proj))
        if not modules:
            raise ValueError("holds no tensors")
        odd = sorted({m.algorithm.name for m in modules.values() if m.algorithm.delta is None})
        if odd:
            raise ValueError(f"{odd[0]} file: not supported by this tool yet (plain LoRA and "
                             "LoCon files are)")
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return modules, dict(lazy.metadata)


def family_of(modules: Mapping[str, Module], meta: Mapping[str, str]) -> str | None:
    return layouts.family_of({f"{s}.x": None for s in modules}, meta)
