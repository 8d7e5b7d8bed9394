"""Which dtype the KV cache gets (engine/device.py resolve_kv_dtype) and the setting's validation."""

from __future__ import annotations

import pytest
import torch

from scalellm.config import EngineConfig
from scalellm.engine.device import resolve_kv_dtype

CPU = torch.device("cpu")


def test_auto_is_bfloat16_under_float32_when_the_weights_are_quantized_on_the_cpu():
    assert resolve_kv_dtype("auto", torch.float32, "gguf", CPU) == torch.bfloat16
    assert resolve_kv_dtype("auto", torch.float32, "int8", CPU) == torch.bfloat16
    assert resolve_kv_dtype("auto", torch.float32, "none", CPU) == torch.float32  # the parity tests' setting
    assert resolve_kv_dtype("auto", torch.bfloat16, "gguf", CPU) == torch.bfloat16
    assert resolve_kv_dtype("auto", torch.float16, "int8", CPU) == torch.float16
    assert resolve_kv_dtype("auto", torch.float32, "int8", torch.device("cuda")) == torch.float32


def test_explicit_settings():
    assert resolve_kv_dtype("float32", torch.float32, "gguf", CPU) == torch.float32
    assert resolve_kv_dtype("bfloat16", torch.float32, "none", CPU) == torch.bfloat16
    assert resolve_kv_dtype("bfloat16", torch.bfloat16, "none", CPU) == torch.bfloat16
    for name, dtype in (("float32", torch.bfloat16), ("bfloat16", torch.float16), ("float32", torch.float16)):
        with pytest.raises(ValueError, match="kv_cache_dtype"):
            resolve_kv_dtype(name, dtype, "none", CPU)


def test_config_validates_kv_cache_dtype():
    assert EngineConfig(kv_cache_dtype="bfloat16").kv_cache_dtype == "bfloat16"
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="float16")
