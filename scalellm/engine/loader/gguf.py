"""GGUF files: metadata to ModelConfig, tensors dequantized to fp32 under Hugging Face names.

llama.cpp's converter stores the q and k projections of Llama-style models with the rows of each
head interleaved for its rotary kernel; `_unpermute` restores Hugging Face's layout (rotate-half):

    gguf rows of one head:  [x0 y0 x1 y1 ... ]      (pairs)
    hf rows of one head:    [x0 x1 ... | y0 y1 ...] (halves)

A broken or hostile file is a `ModelLoadError`, never a crash or a large allocation: every count and
length in the header is checked against the file's size as it is read (gguf_header.py), metadata
values are checked for type and sign, and each tensor's claimed size is checked against the bytes the
file holds before anything is copied or dequantized.
"""

from __future__ import annotations

import collections
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch

from scalellm.engine.loader.base import ModelFiles
from scalellm.engine.loader.gguf_header import read_gguf_header
from scalellm.engine.loader.model_config import ModelConfig, ModelLoadError

SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gemma3": "gemma3"}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GEMMA3_LAYER_NAMES = {
    **_LAYER_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
"""llama.cpp's converter stores Gemma's norm weights as 1 + weight; iter_weights subtracts the 1."""
_LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


class GGUFFiles(ModelFiles):
    """A single .gguf file holding weights, tokenizer and chat template."""

    def __init__(self, path: str, name: str | None = None) -> None:
        self.path = path
        self.name = name or os.path.splitext(os.path.basename(path))[0]
        self.header = read_gguf_header(path)
        try:
            self.config = self._read_config()
        except ModelLoadError:
            raise
        except (TypeError, ValueError, ArithmeticError, IndexError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{path} has invalid GGUF metadata: {exc}") from None

    def _field(self, key: str, default=None):
        return self.header.fields.get(key, default)

    def _read_config(self) -> ModelConfig:
        arch = self._field("general.architecture")
        if arch not in ARCHITECTURES:
            raise ModelLoadError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
        if any(t.name == "rope_freqs.weight" for t in self.header.tensors):
            raise ModelLoadError("GGUF rope frequency factors (Llama 3.1+ rope scaling) are not supported yet")
        for t in self.header.tensors:
            if t.tensor_type.name not in SUPPORTED_TENSOR_TYPES:
                raise ModelLoadError(f"tensor {t.name} has unsupported GGUF type {t.tensor_type.name}")

        def need(key: str):
            value = self._field(f"{arch}.{key}")
            if value is None:
                raise ModelLoadError(f"GGUF metadata is missing {arch}.{key}")
            return value

        hidden = _positive(f"{arch}.embedding_length", need("embedding_length"))
        num_heads = _positive(f"{arch}.attention.head_count", need("attention.head_count"))
        tokens = self._field("tokenizer.ggml.tokens")
        if tokens is None:
            raise ModelLoadError("GGUF metadata has no tokenizer (tokenizer.ggml.tokens)")
        names = {t.name for t in self.header.tensors}
        scaling_type = self._field(f"{arch}.rope.scaling.type", "none")
        rope_scaling = {"rope_type": "default"}
        if scaling_type == "linear":
            rope_scaling = {"rope_type": "linear", "factor": float(self._field(f"{arch}.rope.scaling.factor"))}
        elif scaling_type not in ("none", None):
            raise ModelLoadError(f"GGUF rope scaling {scaling_type!r} is not supported")
        eos = self._field("tokenizer.ggml.eos_token_id")
        extra = _gemma3_fields(self._field, arch, need("block_count")) if arch == "gemma3" else {}
        return ModelConfig(**extra,
            architecture=ARCHITECTURES[arch],
            vocab_size=int(self._field(f"{arch}.vocab_size", len(tokens))),
            hidden_size=hidden,
            intermediate_size=_positive("feed_forward_length", need("feed_forward_length")),
            num_layers=_positive("block_count", need("block_count")),
            num_heads=num_heads,
            num_kv_heads=_positive("head_count_kv", self._field(f"{arch}.attention.head_count_kv", num_heads)),
            head_dim=_positive("key_length", self._field(f"{arch}.attention.key_length", hidden // num_heads)),
            rms_norm_eps=float(self._field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(self._field(f"{arch}.rope.freq_base", 10000.0)),
            max_position_embeddings=int(self._field(f"{arch}.context_length", 2048)),
            tie_word_embeddings="output.weight" not in names,
            attention_bias="blk.0.attn_q.bias" in names,
            rope_scaling=rope_scaling,
            bos_token_id=self._field("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),),
        )

    def iter_weights(self, keep_quantized: tuple[str, ...] = ()) -> Iterator[tuple[str, torch.Tensor]]:
        """keep_quantized: GGUF types (quantization/gguf_blocks.py's KERNEL_TYPES) whose matrices come as
        GGUFTensor, undecoded; everything else is dequantized, the next such tensor on a worker thread
        while the caller copies the current one in (numpy leaves the GIL while it computes)."""
        layer_names = _GEMMA3_LAYER_NAMES if self.config.architecture == "gemma3" else _LAYER_NAMES
        items = []  # (HF name, tensor, kept in its codes)
        for tensor in self.header.tensors:
            name = _hf_name(tensor.name, layer_names)
            if name is not None:
                kept = tensor.tensor_type.name in keep_quantized and name.endswith(".weight") and len(tensor.shape) == 2
                items.append((name, tensor, kept))
        to_dequantize = iter([tensor for _, tensor, kept in items if not kept])
        with ThreadPoolExecutor(_DEQUANTIZE_AHEAD, thread_name_prefix="gguf-dequantize") as pool:
            pending = collections.deque()  # the next tensors to dequantize, in order

            def start_next():
                tensor = next(to_dequantize, None)
                if tensor is not None:
                    pending.append(pool.submit(_dequantize, tensor))

            for _ in range(_DEQUANTIZE_AHEAD):
                start_next()
            for name, tensor, kept in items:
                if kept:
                    yield name, self._quantized(tensor, name)
                    continue
                array = pending.popleft().result()
                start_next()
                yield name, self._float_weight(name, torch.from_numpy(array))

    def _float_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """A dequantized tensor as the model's checkpoint names expect it."""
        if self.config.architecture == "gemma3" and name.endswith("norm.weight"):
            weight = weight - 1
        if self.config.architecture in ("llama", "mistral"):
            if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
                weight = _unpermute(weight, self.config.num_heads)
            elif name.endswith("k_proj.weight") or name.endswith("k_proj.bias"):
                weight = _unpermute(weight, self.config.num_kv_heads)
        return weight

    def _quantized(self, tensor, name: str):
        """The tensor's rows as a GGUFTensor (q and k rows of Llama-style files unpermuted)."""
        from scalellm.engine.quantization.gguf import GGUFTensor

        from gguf.constants import GGML_QUANT_SIZES

        rows, cols = (int(d) for d in reversed(tensor.shape))
        block_size, type_size = GGML_QUANT_SIZES[tensor.tensor_type]
        row_bytes = cols // block_size * type_size
        if cols % block_size or rows * row_bytes != tensor.data.nbytes or rows < 1:
            raise ModelLoadError(f"tensor {tensor.name} of shape {(rows, cols)} needs {rows * row_bytes} bytes but "
                                 f"the file holds {tensor.data.nbytes} for it: the file is truncated or corrupt")
        result = GGUFTensor(tensor.tensor_type.name, tensor.data.reshape(rows, row_bytes), cols)
        if self.config.architecture in ("llama", "mistral") and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = self.config.num_heads if name.endswith("q_proj.weight") else self.config.num_kv_heads
            result = result.rows(_unpermute(torch.arange(rows), heads).numpy())
        return result

    def load_tokenizer(self):
        from scalellm.engine.loader.gguf_tokenizer import load_gguf_tokenizer

        return load_gguf_tokenizer(self.path, self._field("tokenizer.chat_template"))


def _hf_name(gguf_name: str, layer_names: dict[str, str] = _LAYER_NAMES) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_PATTERN.fullmatch(gguf_name)
    if not match or match.group(2) not in layer_names:
        return None
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{layer_names[part]}.{kind}"


def _positive(name: str, value) -> int:
    """A metadata size: a positive integer (GGUF stores them as unsigned ints; a broken file may not)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ModelLoadError(f"GGUF metadata {name} must be a positive integer, got {value!r}")
    return int(value)


def _gemma3_fields(field, arch: str, num_layers: int) -> dict:
    """What Gemma 3 adds to ModelConfig (gemma3_config.py: the layer pattern llama.cpp assumes)."""
    from scalellm.engine.loader.gemma3_config import LOCAL_ROPE_THETA, default_layer_types

    head_dim = field(f"{arch}.attention.key_length", 256)
    if num_layers == 62:  # the 27B model scales by hidden / heads, as llama.cpp assumes
        head_dim = field(f"{arch}.embedding_length") // field(f"{arch}.attention.head_count")
    return dict(sliding_window=_positive("sliding_window", field(f"{arch}.attention.sliding_window", 4096)),
                layer_types=default_layer_types(num_layers), local_rope_theta=LOCAL_ROPE_THETA,
                query_pre_attn_scalar=float(head_dim), final_logit_softcapping=field(f"{arch}.final_logit_softcapping"))


_DEQUANTIZE_AHEAD = 2
"""Tensors dequantized at once on worker threads while the caller copies the current one in."""
_DEQUANTIZE_ROWS = 64
"""Rows dequantized at a time (a few hundred KB of float32 for the usual widths)."""


def _dequantize(tensor) -> np.ndarray:
    from gguf import quants
    from gguf.constants import GGML_QUANT_SIZES

    shape = tuple(int(d) for d in reversed(tensor.shape))
    num_elements = int(np.prod(shape, dtype=object))
    block_size, type_size = GGML_QUANT_SIZES[tensor.tensor_type]
    claimed = num_elements // block_size * type_size
    if num_elements > (1 << 34) or num_elements % block_size or claimed != tensor.data.nbytes:
        raise ModelLoadError(f"tensor {tensor.name} of shape {shape} needs {claimed} bytes but the file holds "
                             f"{tensor.data.nbytes} for it: the file is truncated or corrupt")
    rows = tensor.data.reshape(shape[0] if len(shape) > 1 else 1, -1)  # a tensor's rows are whole blocks
    out = np.empty((rows.shape[0], num_elements // rows.shape[0]), dtype=np.float32)
    try:  # a few rows at a time into the result: gguf-py's own loop keeps every group's output, then joins them
        for start in range(0, rows.shape[0], _DEQUANTIZE_ROWS):
            out[start:start + _DEQUANTIZE_ROWS] = quants.dequantize(rows[start:start + _DEQUANTIZE_ROWS],
                                                                    tensor.tensor_type)
    except (ValueError, NotImplementedError) as exc:
        raise ModelLoadError(f"cannot dequantize tensor {tensor.name}: {exc}") from None
    return out.reshape(shape)


def _unpermute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    rows = weight.shape[0]
    rest = weight.shape[1:]
    return (weight.reshape(num_heads, rows // num_heads // 2, 2, *rest)
            .transpose(1, 2).reshape(weight.shape).contiguous())
