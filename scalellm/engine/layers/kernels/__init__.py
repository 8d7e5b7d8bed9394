"""C++ CPU kernels, compiled on first use with torch.utils.cpp_extension.

`load_paged_attention()` returns `paged_decode_attention(q, k_cache, v_cache, block_table,
context_lens, block_size, scale, sliding_window) -> out` (`load_paged_attention_avx2()` its AVX2 path
alone); `load_int8_linear()` returns
`int8_linear(x, packed, compensation, w_scales, bias, n) -> y` (see int8_linear.cpp;
`load_int8_linear_path("avx2" | "portable")` one of its paths alone);
`load_quantized_linear()` the linear op on weights kept in their GGUF codes (quantized_linear.cpp;
`load_quantized_linear_avx2()` its AVX2 path alone);
`load_norm_rotary()` the fused `add_rms_norm`, `rotary_` and `silu_and_mul` in float32 or bfloat16
(FUSED_DTYPES; a NormRotaryOps; see norm_rotary.cpp); `load_token_bitmask()` `apply_token_bitmask_(logits, bitmask,
rows)`, grammar bitmasks applied to logits in place (token_bitmask.cpp); `load_decode_layers()` one op that runs a Llama-family model's
decoder layers for a step of one-query rows by calling the others (decode_layers.cpp). Each is None when
its kernel cannot be built (no C++ compiler, no ninja, a compile error); `kernel_load_error(name)`
then says why. The kernels share the AVX-512 bfloat16 loads and stores of avx512_bf16.h.

What the attention op computes (see the comment block of paged_attention.cpp): for each decode row b with
ctx = context_lens[b] and each query head h, softmax(scale * q[b, h] . K[t]) over the key positions
t in [max(0, ctx - sliding_window), ctx) (the whole context when sliding_window <= 0), weighted sum
of V[t]; float32 or bfloat16 in, float accumulation. K[t] / V[t] are read in place from the paged
cache [slots, KH, D] through the block table (slot = block * block_size + t % block_size), one
(row, KV head) pair per task on the intra-op thread pool, each K/V vector loaded once for the G
query heads that share it: no gather copy of the context.

Build: -O3 -march=native -fopenmp into $XDG_CACHE_HOME (or ~/.cache)/scalellm/kernels/<name>-<hash>,
the hash covering the source, torch's version, the architecture and the CPU's feature flags, so
processes on one machine share the build and a changed source or CPU gets a fresh one. A file lock
serializes builds of one directory (two replicas starting together build once). When ninja is not
on PATH but the `ninja` package is installed, its bin directory is appended to PATH.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from scalellm.cpu import cpu_flags

logger = logging.getLogger(__name__)

_DIR = Path(__file__).parent
_CFLAGS = ["-O3", "-march=native", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]
KERNELS: dict[str, tuple[str, str, list[str]]] = {
    # name: (source file, op name in torch.ops.scalellm, extra compiler flags)
    # Without the two flags GCC leaves the softmax's exponentials scalar (std::nearbyint is a call).
    "paged_attention": ("paged_attention.cpp", "paged_decode_attention", ["-fno-trapping-math", "-fno-math-errno"]),
    # Its AVX2 path built on an AVX-512 CPU too, so that tests cover it there.
    "paged_attention_avx2": ("paged_attention.cpp", "paged_decode_attention_avx2",
                             ["-fno-trapping-math", "-fno-math-errno", "-mno-avx512f",
                              "-DSCALELLM_OP=paged_decode_attention_avx2"]),
    # No fused multiply-add contraction: the epilogue must round like the unfused torch path.
    "int8_linear": ("int8_linear.cpp", "int8_linear", ["-ffp-contract=off"]),
    # Its AVX2 and portable paths built alone, so that tests cover each on CPUs that have more.
    "int8_linear_avx2": ("int8_linear.cpp", "int8_linear_avx2",
                         ["-ffp-contract=off", "-mno-avx512f", "-DSCALELLM_OP=int8_linear_avx2"]),
    "int8_linear_portable": ("int8_linear.cpp", "int8_linear_portable",
                             ["-ffp-contract=off", "-mno-avx2", "-DSCALELLM_OP=int8_linear_portable"]),
    # Weights in their GGUF codes (see quantization/gguf.py); AVX512-VNNI, or AVX2 without AVX-512.
    "quantized_linear": ("quantized_linear.cpp", "quantized_linear", []),
    # Its AVX2 path built on an AVX-512 CPU too, so that tests cover it there.
    "quantized_linear_avx2": ("quantized_linear.cpp", "quantized_linear_avx2",
                              ["-mno-avx512f", "-DSCALELLM_OP=quantized_linear_avx2"]),
    # Rounding between steps must match torch's chain of ops: no contraction either. Neither of the
    # other two flags changes a result; without them GCC leaves the float32 rows' loops scalar.
    "norm_rotary": ("norm_rotary.cpp", "add_rms_norm", ["-ffp-contract=off", "-fno-trapping-math",
                                                        "-fno-math-errno"]),
    # Calls paged_attention and the linear kernels through the dispatcher: load them first
    # (load_decode_layers does). Runs norm_rotary's row functions (rows.h) itself: built with its flags.
    "decode_layers": ("decode_layers.cpp", "decode_layers", ["-ffp-contract=off", "-fno-trapping-math",
                                                            "-fno-math-errno"]),
    # Grammar bitmasks onto logits (structured outputs), AVX-512 or scalar.
    "token_bitmask": ("token_bitmask.cpp", "apply_token_bitmask_", []),
}


def load_paged_attention() -> Callable[..., torch.Tensor] | None:
    """The compiled paged decode-attention op, or None when it cannot be built (warned once)."""
    return _build_kernel("paged_attention")[0]


def load_paged_attention_avx2() -> Callable[..., torch.Tensor] | None:
    """The same op built for AVX2 alone (its register path for CPUs without AVX-512), or None; for tests."""
    return _build_kernel("paged_attention_avx2")[0]


def load_int8_linear() -> Callable[..., torch.Tensor] | None:
    """The compiled fused W8A8 linear op, or None when it cannot be built (warned once)."""
    return _build_kernel("int8_linear")[0]


def load_int8_linear_path(path: str) -> Callable[..., torch.Tensor] | None:
    """The same op built for one of its paths alone ("avx2" or "portable"), or None; for tests."""
    return _build_kernel(f"int8_linear_{path}")[0]


def load_quantized_linear() -> Callable[..., torch.Tensor] | None:
    """The compiled linear op on GGUF-quantized weights, or None when it cannot be built (warned once)."""
    return _build_kernel("quantized_linear")[0]


def load_quantized_linear_avx2() -> Callable[..., torch.Tensor] | None:
    """The same op built for AVX2 alone (its path for CPUs without AVX-512), or None; for tests."""
    return _build_kernel("quantized_linear_avx2")[0]


def load_token_bitmask() -> Callable[..., torch.Tensor] | None:
    """The compiled in-place grammar-bitmask op (token_bitmask.cpp), or None when it cannot be built."""
    return _build_kernel("token_bitmask")[0]


FUSED_DTYPES = (torch.float32, torch.bfloat16)
"""The dtypes the ops of norm_rotary.cpp, and so the fused decode layers, take."""


class NormRotaryOps(NamedTuple):
    """The fused ops of norm_rotary.cpp (their contracts are in its comment block)."""

    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rotary_: Callable[..., torch.Tensor]
    silu_and_mul: Callable[..., torch.Tensor]


def load_norm_rotary() -> NormRotaryOps | None:
    """The fused ops of norm_rotary.cpp, or None when it cannot be built (warned once)."""
    add_rms_norm = _build_kernel("norm_rotary")[0]
    if add_rms_norm is None:
        return None
    return NormRotaryOps(add_rms_norm, torch.ops.scalellm.rotary_, torch.ops.scalellm.silu_and_mul)


def load_decode_layers() -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
    """The compiled op that runs every decoder layer of a step of one-query rows, or None when it or one
    of the kernels it calls cannot be built (see decode_layers.cpp). Its first argument is a
    torch.classes.scalellm.DecodeLayers holding the model's tensors and caches, made once."""
    if load_paged_attention() is None or load_int8_linear() is None:
        return None
    return _build_kernel("decode_layers")[0]


SERVING_KERNELS = ("quantized_linear", "paged_attention", "norm_rotary", "int8_linear", "token_bitmask",
                   "decode_layers")
"""The kernels serving loads (the longest builds first); the others are single paths, built for tests."""


def prebuild(jobs: int | None = None) -> dict[str, str | None]:
    """Build SERVING_KERNELS into the cache on `jobs` processes (one compiler each; default: the cores),
    so that the first replica does not wait for the compiler: kernel -> None, or why it cannot be built.
    Each is built and loaded in a process of its own, as a replica would load it (decode_layers after the
    kernels it calls: their file locks make it wait for builds under way elsewhere)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    jobs = jobs or len(os.sched_getaffinity(0))
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return dict(zip(SERVING_KERNELS, pool.map(_build_alone, SERVING_KERNELS)))


def _build_alone(name: str) -> str | None:
    if name == "decode_layers":
        load_decode_layers()  # the kernels it calls first
    return kernel_load_error(name)


def kernel_load_error(name: str) -> str | None:
    """Why the kernel `name` (a key of KERNELS) cannot be loaded; None when it is available."""
    return _build_kernel(name)[1]


def paged_attention_load_error() -> str | None:
    """Why load_paged_attention() returns None; None when the kernel is available."""
    return kernel_load_error("paged_attention")


_BUILT: dict[str, tuple[Callable[..., torch.Tensor] | None, str | None]] = {}
_BUILD_LOCK = threading.Lock()


def _build_kernel(name: str) -> tuple[Callable[..., torch.Tensor] | None, str | None]:
    """The op and None, or None and why; built and loaded once per process, whichever thread asks
    first (the model's layers are processed on several threads at load)."""
    with _BUILD_LOCK:
        if name not in _BUILT:
            _BUILT[name] = _build(name)
        return _BUILT[name]


def _build(name: str) -> tuple[Callable[..., torch.Tensor] | None, str | None]:
    source, op_name, flags = KERNELS[name]
    try:
        _compile_and_load(f"scalellm_{name}", _DIR / source, flags)
        return getattr(torch.ops.scalellm, op_name), None
    except Exception as exc:  # any build or load failure means: use the torch path
        reason = _short_reason(exc)
        logger.warning("C++ kernel %s unavailable, the torch path is used instead: %s", name, reason)
        return None, reason


def _compile_and_load(name: str, source: Path, extra_flags: list[str]) -> None:
    """Build `source` into the shared cache directory (once per machine) and load it as a torch library."""
    from filelock import FileLock  # a dependency of torch
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r} is not on PATH)")
    _ensure_ninja_on_path()
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not available (pip install ninja)")
    cflags = _CFLAGS + extra_flags
    build_dir = _cache_root() / f"{name}-{_build_hash(source, compiler, cflags)}"
    build_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(build_dir / "scalellm.lock")):
        # Under this lock no other loader is building here: a torch baton left behind by a process
        # killed mid-build would otherwise make every later build wait forever.
        (build_dir / "lock").unlink(missing_ok=True)
        cpp_extension.load(name=name, sources=[str(source)], extra_cflags=cflags,
                           extra_ldflags=_LDFLAGS, build_directory=str(build_dir),
                           is_python_module=False, verbose=False)


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "scalellm" / "kernels"


def _build_hash(source: Path, compiler: str, cflags: list[str]) -> str:
    digest = hashlib.sha256(source.read_bytes())
    for header in sorted(_DIR.glob("*.h")):  # the kernels' shared headers
        digest.update(b"\0" + header.read_bytes())
    flags = " ".join(sorted(cpu_flags())) or platform.processor()  # what -march=native compiles for
    for part in (torch.__version__, platform.machine(), compiler, " ".join(cflags), flags):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()[:16]


def _ensure_ninja_on_path() -> None:
    """torch runs `ninja` from PATH; a pip-installed ninja in a non-activated venv is not on it."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = os.pathsep.join([os.environ.get("PATH", ""), ninja.BIN_DIR])


def _short_reason(exc: Exception) -> str:
    """The exception's message, cut to its last lines (compiler output can be long)."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return " | ".join(lines[-6:])
