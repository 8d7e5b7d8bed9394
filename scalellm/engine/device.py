"""Picking the device and dtype for "auto"."""

from __future__ import annotations

import torch

from scalellm.cpu import cpu_flags

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto": bfloat16 on CUDA and on CPUs with AVX512-BF16 or AMX, float32 otherwise."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda" or cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


def cpu_has_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())



def resolve_kv_dtype(name: str, dtype: torch.dtype, quantization: str, device: torch.device) -> torch.dtype:
    """The KV cache's dtype. "auto": bfloat16 under float32 activations on the CPU when the weights are
    quantized (the file's GGUF codes or int8: their activations are rounded to 8 bits already, and a
    16-bit cache halves what decode attention reads), else the activations' dtype. An explicit
    "bfloat16" under float32 needs the CPU (the C++ attention kernel or the torch path)."""
    if name == "auto":
        quantized = quantization not in ("none", None)
        return torch.bfloat16 if dtype == torch.float32 and quantized and device.type == "cpu" else dtype
    kv_dtype = _DTYPES[name]
    if kv_dtype != dtype and (kv_dtype, dtype) != (torch.bfloat16, torch.float32):
        raise ValueError(f"kv_cache_dtype {name} with {str(dtype).removeprefix('torch.')} activations: the cache "
                         f"is in the activations' dtype or bfloat16 under float32")
    return kv_dtype
