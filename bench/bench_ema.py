#!/usr/bin/env python
"""Cost of one EMA update of the LoRA weights (`ema_decay`, library/train/ema.py).

Builds the full-size SD1.5 and SDXL UNets from the bundled configs on the meta device (no
weights), attaches rank-32 LoRA to the kohya default targets (the transformer blocks'
Linear layers), gives the LoRA real tensors on the GPU and times `LoraEMA.update` on the
GPU and with `ema_cpu`. Prints one JSON line per case.

    python bench/bench_ema.py [--iters 200]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def lora_network(family: str, rank: int, device):
    from diffusers import UNet2DConditionModel
    from networks.lora import LoRANetwork
    from networks.targets import RankSpec, unet_targets
    config = UNet2DConditionModel.load_config(str(ROOT / "configs" / "models" / family / "unet"))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        network = LoRANetwork(unet_targets(unet, family, RankSpec(rank, rank)))
    network.to_empty(device=device)
    with torch.no_grad():
        for p in network.parameters():
            p.normal_(0, 0.01)
    return network


def time_updates(ema, network, iters: int, device) -> float:
    """ms per update, after a nudge of the weights each time (as an optimizer step would)."""
    params = [p for p in network.parameters() if p.requires_grad]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for k in range(1, 4):
        ema.update(k)
    sync()
    started = time.perf_counter()
    for k in range(4, 4 + iters):
        ema.update(k)
    sync()
    return (time.perf_counter() - started) / iters * 1000.0 if params else 0.0


def main() -> int:
    from library.train.ema import LoraEMA
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--rank", type=int, default=32)
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for family in ("sd15", "sdxl"):
        network = lora_network(family, a.rank, device)
        n = sum(p.numel() for p in network.parameters() if p.requires_grad)
        for cpu in (False, True):
            ema = LoraEMA(network, 0.99, cpu=cpu)
            iters = a.iters if not cpu else max(5, a.iters // 10)
            ms = time_updates(ema, network, iters, device)
            print(json.dumps({"family": family, "rank": a.rank, "modules": len(network),
                              "lora_params": n, "ema_cpu": cpu, "device": str(device),
                              "gpu": torch.cuda.get_device_name() if device.type == "cuda"
                              else None, "ms_per_update": round(ms, 3)}), flush=True)
            del ema
        del network
    return 0


if __name__ == "__main__":
    sys.exit(main())
