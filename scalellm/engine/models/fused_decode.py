"""Every decoder layer of a step whose tokens all attend as one-query rows, as one C++ call
(layers/kernels/decode_layers.cpp): decode steps, and with the C++ kernel steps whose prompt chunks
are short enough to be laid out as rows too (step_inputs.py).

With one token per request a layer is some 15 small ops, and the Python around each (module calls,
views, dispatch) costs as much as a small op itself: several milliseconds per step for a 30-layer
model, which is most of what separates one request's decode step from the time to read the weights.
The C++ op runs the same scalellm ops in the same order on the same tensors, so its result is bit
for bit the Python layers'.

It applies to Llama-family models (GatedMLP feed-forward, no experts) in float32 or bfloat16 on the
CPU, on one rank, with the C++ decode attention, and with int8 (fused kernel), GGUF-quantized (quantized kernel)
or unquantized projections.
Steps that carry a prefill span (a chunk past attention.row_chunk_limit), steps that stop
between layers (a prefill step lending cores), and every other configuration run the Python layers.
"""

from __future__ import annotations

from typing import Callable

import torch

from scalellm.engine.layers.attention import AttentionMetadata
from scalellm.engine.layers.kernels import FUSED_DTYPES
from scalellm.engine.layers.mlp import GatedMLP
from scalellm.engine.quantization.unquantized import Unquantized


class FusedDecodeLayers:
    """Holds the layers' tensors in the op's order; call it with a decode-only step's hidden states."""

    def __init__(self, op: Callable, weights: list[torch.Tensor], num_heads: int, num_kv_heads: int,
                 eps: float) -> None:
        self.op = op
        self.weights = weights
        self.num_heads, self.num_kv_heads, self.eps = num_heads, num_kv_heads, eps
        self._caches_of: list | None = None  # the (K, V) list `_layers` holds
        self._layers = None  # torch.classes.scalellm.DecodeLayers: the tensors, handed to C++ once

    @classmethod
    def build(cls, model: torch.nn.Module, decode_backend: str) -> FusedDecodeLayers | None:
        """For a loaded LlamaForCausalLM: the fused layers, or None where they do not apply."""
        if (decode_backend != "cpp" or model.norm.weight.dtype not in FUSED_DTYPES
                or model.norm.weight.device.type != "cpu"):
            return None
        weights: list[torch.Tensor] = []
        for layer in model.layers:
            attention = layer.self_attn
            mlp = layer.mlp
            if (type(mlp) is not GatedMLP or mlp.fused_silu_and_mul is None or attention.o_proj.group.world_size != 1
                    or layer.input_layernorm.fused is None or layer.post_attention_layernorm.fused is None):
                return None
            projections = [_operands(p) for p in (attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj)]
            if any(p is None for p in projections):
                return None
            qkv, o, gate_up, down = projections
            weights += [layer.input_layernorm.weight, *qkv, *o, layer.post_attention_layernorm.weight, *gate_up, *down]
        from scalellm.engine.layers.kernels import load_decode_layers

        op = load_decode_layers()
        if op is None:
            return None
        first = model.layers[0]
        return cls(op, weights, first.self_attn.num_heads, first.self_attn.num_kv_heads,
                   first.input_layernorm.eps)

    def applies_to(self, meta: AttentionMetadata, num_tokens: int) -> bool:
        """True for a step whose tokens all attend as one-query rows."""
        return meta.num_decode_tokens == num_tokens and not meta.prefills and meta.decode_backend == "cpp"

    def __call__(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                 kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, hidden] (the embeddings) -> (the last layer's output, the residual stream before it)."""
        if kv_caches is not self._caches_of:
            self._layers = torch.classes.scalellm.DecodeLayers(self.weights, [k for k, _ in kv_caches],
                                                               [v for _, v in kv_caches])
            self._caches_of = kv_caches
        cos, sin = rope
        return self.op(self._layers, x, cos, sin, meta.slot_mapping, meta.decode_block_table,
                       meta.decode_context_lens, meta.block_size, meta.decode_sliding_window, self.num_heads,
                       self.num_kv_heads, self.eps)


def _operands(linear: torch.nn.Module) -> list[torch.Tensor] | None:
    """A projection's five tensors for the op (see decode_layers.cpp), or None if it cannot take it."""
    empty = torch.empty(0)
    if getattr(linear, "fused_op", None) is not None:  # int8 with the fused kernel
        bias = linear.bias_f32 if linear.bias is not None else empty
        return [linear.weight_packed, linear.weight_compensation, linear.weight_scales, bias, empty]
    if getattr(linear, "quantized_op", None) is not None:  # GGUF codes with the quantized kernel
        bias = linear.bias_f32 if linear.bias is not None else empty
        minimums = linear.qweight_minimums if linear.qweight_minimums is not None else empty
        return [linear.qweight_packed, linear.qweight_scales, minimums, bias,
                torch.tensor(linear.qweight_meta, dtype=torch.int64)]
    if isinstance(linear.quant_method, Unquantized) or getattr(linear, "weight", None) is not None:
        return [linear.weight, linear.bias if linear.bias is not None else empty, empty, empty, empty]
    return None
