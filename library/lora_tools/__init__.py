"""Shared pieces of the LoRA tools (tools/resize_lora.py, merge_lora.py, svd_merge_lora.py,
extract_lora.py): lazy safetensors I/O, any LoRA file as per-module deltas, SVD with rank
rules, base models as streamable weight files, and the kohya writer."""
