"""Tests for networks/kohya_file.py: round trip, the A1111 hashes, atomic writes.

The hashes are recomputed here from first principles: a safetensors file is an 8-byte
little-endian header length, the JSON header, then the tensor data.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file

from library import durable
from networks.kohya_file import read_lora, write_lora

STEM = "lora_unet_down_blocks_0_attentions_0_proj_in"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_tensors(seed: int = 0, big: bool = False) -> dict[str, torch.Tensor]:
    """A kohya-shaped state dict; `big` makes the file pass 1 MiB + 64 KiB (legacy hash)."""
    g = torch.Generator().manual_seed(seed)
    width = 640 if big else 16
    return {
        f"{STEM}.lora_down.weight": torch.randn(4, width, 1, 1, generator=g).half(),
        f"{STEM}.lora_up.weight": torch.randn(width, 4, 1, 1, generator=g).half(),
        f"{STEM}.alpha": torch.tensor(2.0).half(),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight":
            torch.randn(4 if not big else 512, 32 if not big else 640, generator=g),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight":
            torch.randn(37, 4 if not big else 512, generator=g).to(torch.bfloat16),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(4.0),
    }


SS_META = {"ss_network_module": "networks.lora", "ss_network_dim": 4, "ss_network_alpha": 2.0,
           "ss_base_model_version": "sd_v1", "ss_tag_frequency": json.dumps({"a": {"cat": 3}}),
           "ss_seed": 42, "ss_v2": False}
OTHER_META = {"modelspec.title": "tëst ☃", "modelspec.architecture":
              "stable-diffusion-v1/lora", "tomlora_config": json.dumps({"x": [1, 2]})}


def tensor_data(blob: bytes) -> bytes:
    header_len = int.from_bytes(blob[:8], "little")
    json.loads(blob[8:8 + header_len])  # the length really delimits the JSON header
    return blob[8 + header_len:]


def ss_only_file_bytes(tmp_path, tensors, metadata) -> bytes:
    """The file kohya hashes: same tensors, only the ss_* metadata, written by safetensors."""
    path = tmp_path / "ss_only.safetensors"
    save_file(tensors, str(path),
              metadata={str(k): str(v) for k, v in metadata.items() if str(k).startswith("ss_")})
    blob = path.read_bytes()
    path.unlink()
    return blob


def test_round_trip(tmp_path):
    tensors = make_tensors()
    path = tmp_path / "out" / "lora.safetensors"  # the parent folder is created
    write_lora(path, tensors, {**SS_META, **OTHER_META})
    loaded, meta = read_lora(path)
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype, k
        assert loaded[k].shape == v.shape, k
        assert torch.equal(loaded[k], v), k
    assert loaded[f"{STEM}.alpha"].dim() == 0
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    for k, v in {**SS_META, **OTHER_META}.items():
        assert meta[k] == str(v), k
    assert meta["ss_v2"] == "False" and meta["ss_seed"] == "42"
    assert set(meta) == set(SS_META) | set(OTHER_META) | {"sshs_model_hash",
                                                           "sshs_legacy_hash"}
    assert os.listdir(path.parent) == [path.name]  # no temp file left behind


def test_model_hash_is_sha256_of_tensor_data_with_ss_only_metadata(tmp_path):
    tensors = make_tensors()
    path = tmp_path / "lora.safetensors"
    write_lora(path, tensors, {**SS_META, **OTHER_META})
    _, meta = read_lora(path)
    expected = hashlib.sha256(tensor_data(ss_only_file_bytes(tmp_path, tensors,
                                                              SS_META))).hexdigest()
    assert meta["sshs_model_hash"] == expected
    assert re.fullmatch(r"[0-9a-f]{64}", meta["sshs_model_hash"])


def test_legacy_hash_is_8_hex_of_the_64k_at_1mib(tmp_path):
    tensors = make_tensors(big=True)
    path = tmp_path / "lora.safetensors"
    write_lora(path, tensors, {**SS_META, **OTHER_META})
    _, meta = read_lora(path)
    blob = ss_only_file_bytes(tmp_path, tensors, SS_META)
    assert len(blob) >= 0x110000
    assert re.fullmatch(r"[0-9a-f]{8}", meta["sshs_legacy_hash"])
    assert meta["sshs_legacy_hash"] == hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]


def test_small_file_legacy_hash_is_still_8_hex(tmp_path):
    path = tmp_path / "lora.safetensors"
    write_lora(path, make_tensors(), SS_META)
    assert re.fullmatch(r"[0-9a-f]{8}", read_lora(path)[1]["sshs_legacy_hash"])


def test_hashes_ignore_non_ss_metadata_and_follow_tensors(tmp_path):
    tensors = make_tensors(big=True)
    a, b, c, d = (tmp_path / f"{n}.safetensors" for n in "abcd")
    write_lora(a, tensors, {**SS_META, **OTHER_META})
    write_lora(b, tensors, {**SS_META, "modelspec.title": "something else entirely",
                            "modelspec.date": "2030-01-01T00:00:00", "tomlora_config": "{}"})
    write_lora(c, tensors, SS_META)
    ha, hb, hc = (read_lora(p)[1] for p in (a, b, c))
    for key in ("sshs_model_hash", "sshs_legacy_hash"):
        assert ha[key] == hb[key] == hc[key], key
    assert a.read_bytes() != b.read_bytes()  # the files themselves do differ

    changed = dict(tensors)
    changed[f"{STEM}.alpha"] = torch.tensor(3.0).half()
    write_lora(d, changed, {**SS_META, **OTHER_META})
    assert read_lora(d)[1]["sshs_model_hash"] != ha["sshs_model_hash"]


def test_stale_hashes_in_metadata_are_replaced(tmp_path):
    """Re-saving metadata read from another file must not carry its hashes over."""
    path = tmp_path / "lora.safetensors"
    write_lora(path, make_tensors(), {**SS_META, "sshs_model_hash": "0" * 64,
                                       "sshs_legacy_hash": "deadbeef"})
    _, meta = read_lora(path)
    assert meta["sshs_model_hash"] == hashlib.sha256(tensor_data(
        ss_only_file_bytes(tmp_path, make_tensors(), SS_META))).hexdigest()
    assert meta["sshs_legacy_hash"] != "deadbeef"


@pytest.mark.parametrize("fail_at", ["replace", "fsync"])
def test_failed_write_keeps_previous_file_and_leaves_no_temp(tmp_path, monkeypatch, fail_at):
    path = tmp_path / "lora.safetensors"
    write_lora(path, make_tensors(seed=0), SS_META)
    previous = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError(f"simulated {fail_at} failure")

    monkeypatch.setattr(durable.os, fail_at, boom)  # the atomic write lives there
    with pytest.raises(OSError, match="simulated"):
        write_lora(path, make_tensors(seed=1), {**SS_META, **OTHER_META})
    monkeypatch.undo()

    assert path.read_bytes() == previous
    assert os.listdir(tmp_path) == [path.name]
    loaded, _ = read_lora(path)
    assert torch.equal(loaded[f"{STEM}.lora_up.weight"], make_tensors(seed=0)[
        f"{STEM}.lora_up.weight"])


def test_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "lora.safetensors"

    def boom(*args, **kwargs):
        raise OSError("simulated replace failure")

    monkeypatch.setattr(durable.os, "replace", boom)
    with pytest.raises(OSError):
        write_lora(path, make_tensors(), SS_META)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []
