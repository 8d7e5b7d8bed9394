"""Engine configuration: frozen, validated at construction, with a docstring per field."""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("auto", "cpp", "torch")
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class EngineConfig:
    """Everything that shapes one engine instance."""

    model: str | None = None
    """A Hugging Face directory, a .gguf file, or None for the default model (SmolLM2-135M-Instruct)."""
    dtype: str = "auto"
    """"auto" is bfloat16 on CUDA and on CPUs with AVX512-BF16, float32 otherwise."""
    device: str = "auto"
    """"auto" picks CUDA when available, else the CPU."""
    kv_cache_gib: float = 1.0
    """Memory for the paged KV cache, in GiB per rank; it fixes the number of blocks. Each rank holds only
    its own KV heads, so with tensor parallelism the same budget holds more blocks."""
    kv_cache_dtype: str = "auto"
    """"auto": bfloat16 under float32 activations on the CPU when the weights are quantized (GGUF codes
    or int8), else `dtype`; "bfloat16" under float32 asks for that cache everywhere on the CPU."""
    block_size: int = 16
    """Tokens per KV block."""
    max_model_len: int | None = None
    """Context length cap; None uses the model's own (capped at 8192)."""
    max_num_seqs: int = 128
    """Most requests in one batch."""
    max_num_batched_tokens: int = 512
    """Token budget per step: decodes first, then prefill chunks."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of identical prompt prefixes."""
    num_threads: int | None = None
    """torch intra-op threads per rank; None leaves torch's default with one rank, and gives each of
    several ranks an equal share of this machine's cores."""
    core_board: str | None = None
    """A file shared by the replicas of this machine, one byte each (engine/core_board.py): a step
    taken while every other replica is idle uses `threads_when_alone` threads. None: no lending."""
    core_board_slot: int = 0
    """This replica's byte on `core_board`."""
    threads_when_alone: int | None = None
    """Intra-op threads for steps taken while the other replicas on `core_board` are idle
    (None: num_threads)."""
    seed: int = 0
    """Seed for requests that bring none."""
    quantization: str | None = "auto"
    """"auto": a GGUF's quantized linear weights are kept in their own types ("gguf") on a CPU with
    AVX512-VNNI, other models stay in `dtype`; "none" (or None) keeps the weights in `dtype`; "int8" is W8A8
    dynamic int8 (per-channel weights, per-token activations); "gguf" keeps a GGUF's quantization."""
    attention_backend: str = "auto"
    """Decode attention: "cpp" is a fused C++ CPU kernel reading the paged KV cache in place (compiled on
    first use; float32/bfloat16 on the CPU), "torch" is scaled_dot_product_attention on gathered blocks,
    "auto" is "cpp" where it applies and builds, else "torch"."""
    fused_decode: bool = True
    """Run a decode-only step's decoder layers as one C++ op where it applies (Llama-family models in
    float32 or bfloat16 on the CPU, one rank, C++ decode attention); the same arithmetic as the Python layers
    without their per-op overhead. False always runs the Python layers."""
    tensor_parallel_size: int = 1
    """Processes (ranks) one engine runs on: rank 0 is this process (scheduler, sampling), ranks 1..N-1
    are worker processes it starts. Attention heads, MLP rows, the vocabulary and experts are split
    over them; gloo on the CPU, NCCL on CUDA (one GPU per rank)."""
    enable_expert_parallel: bool = False
    """MoE models: each rank holds whole experts (an equal share of them) instead of a slice of every
    expert; attention stays tensor-parallel."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.kv_cache_gib <= 0:
            raise ValueError("kv_cache_gib must be > 0")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError("block_size must be a power of two")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError("max_model_len must be >= 1")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.quantization not in (None, "auto", "none", "int8", "gguf"):
            raise ValueError(f"quantization must be auto, none, int8 or gguf, got {self.quantization!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError("num_threads must be >= 1")
        if self.threads_when_alone is not None and self.threads_when_alone < (self.num_threads or 1):
            raise ValueError("threads_when_alone must be >= num_threads")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, "
                             f"got {self.attention_backend!r}")
