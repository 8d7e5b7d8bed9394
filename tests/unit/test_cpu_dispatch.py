"""What the CPU's flags select: the quantized kernel's instruction set and llama.cpp's peer build."""

from __future__ import annotations

import pytest

from scalellm.bench.peer_install import llama_cmake_options
from scalellm.engine.quantization import gguf

ZEN3 = frozenset("fpu sse2 avx avx2 fma f16c bmi2 vaes".split())
SAPPHIRE_RAPIDS = ZEN3 | {"avx512f", "avx512bw", "avx512vbmi", "avx512_vnni", "avx512_bf16", "amx_tile",
                          "amx_int8", "amx_bf16"}


@pytest.mark.parametrize("flags, isa", [(SAPPHIRE_RAPIDS, "avx512-vnni"), (ZEN3, "avx2"),
                                        (ZEN3 - {"f16c"}, None), (frozenset(), None)])
def test_kernel_isa_follows_the_flags(monkeypatch, flags, isa):
    monkeypatch.setattr(gguf, "cpu_flags", lambda: flags)
    assert gguf.kernel_isa() == isa
    if isa is None:
        assert gguf.kernel_op() is None  # the dequantized fallback, never a kernel that faults


def test_llama_cpp_builds_avx512_only_where_the_cpu_has_it():
    avx2 = llama_cmake_options(ZEN3)
    assert not any("AVX512" in option for option in avx2)
    assert "-DGGML_AVX2=ON" in avx2 and "-DGGML_NATIVE=OFF" in avx2
    spr = llama_cmake_options(SAPPHIRE_RAPIDS)
    assert {"-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON", "-DGGML_AVX512_VBMI=ON"} <= set(spr)
    assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF"} <= set(spr)  # AMX off even where present
    assert "-DGGML_AVX512_BF16=ON" not in llama_cmake_options(SAPPHIRE_RAPIDS - {"avx512_bf16"})
