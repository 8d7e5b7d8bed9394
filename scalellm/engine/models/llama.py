"""The Llama family in one file: Llama 2/3, Mistral, Qwen2 (QKV bias); GQA; tied or untied embeddings.

Tokens of all requests in a step are flattened into one sequence [T]; attention separates them by the
metadata the model runner built. q/k/v and gate/up are fused into one matmul each. The layers keep
this rank's share of the weights (tensor parallelism lives in layers/), so the same code runs on any
number of ranks; `make_mlp` is where mixture-of-experts models (mixtral.py) differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from scalellm.engine.layers.attention import AttentionMetadata, paged_attention
from scalellm.engine.layers.linear import QKVParallelLinear, RowParallelLinear
from scalellm.engine.layers.mlp import GatedMLP
from scalellm.engine.layers.norm import RMSNorm
from scalellm.engine.layers.options import LayerOptions
from scalellm.engine.layers.rotary import RotaryEmbedding, apply_rotary
from scalellm.engine.layers.vocab import LogitsHead, VocabParallelEmbedding
from scalellm.engine.loader.model_config import ModelConfig
from scalellm.engine.models.fused_decode import FusedDecodeLayers
from scalellm.engine.models.weight_loading import load_model_weights


@dataclass
class ForwardContext:
    """What one forward pass reads besides token ids and positions."""

    attention: AttentionMetadata
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    """Per layer: (k_cache, v_cache), each [num_slots, num_kv_heads on this rank, head_dim]."""
    layer_attention: list[AttentionMetadata] | None = None
    """Per layer, when the KV cache has several groups (kv_cache/groups.py: Gemma 3's sliding layers
    among full ones); None: `attention` serves every layer."""

    between_layers: Callable[[], None] | None = None
    """Called after each layer of a step run layer by layer (the engine re-reads its core board there)."""

    def attention_for(self, layer_index: int) -> AttentionMetadata:
        return self.attention if self.layer_attention is None else self.layer_attention[layer_index]


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, options: LayerOptions) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(config.hidden_size, config.head_dim, config.num_heads, config.num_kv_heads,
                                          options, bias=config.attention_bias)
        self.o_proj = RowParallelLinear(config.num_heads * config.head_dim, config.hidden_size, options,
                                        input_slice=self.qkv_proj.q_columns)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_local_heads, self.qkv_proj.num_local_kv_heads
        self.head_dim = config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split = [q_size + kv_size, kv_size]

    def forward(self, rope, x: torch.Tensor, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        qk, v = self.qkv_proj(x).split(self.split, dim=-1)
        # q and k are rotated together: [T, H + KH, D]
        qk = apply_rotary(qk.view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim), *rope)
        q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]  # [T, H, D], [T, KH, D]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        out = paged_attention(q, k, v, kv_cache, meta)  # [T, H, D]
        return self.o_proj(out.reshape(num_tokens, -1))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, options: LayerOptions, mlp: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, options.dtype)
        self.self_attn = LlamaAttention(config, options)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, options.dtype)
        self.mlp = mlp

    def forward(self, rope, x, residual, kv_cache, meta) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, residual) -> (this layer's output, the residual stream before it); their sum is the
        hidden state. Carrying them apart lets each norm add them in the same pass (first layer:
        residual None)."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(rope, h, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    """Checkpoint names follow Hugging Face's; `load_weights` maps them onto the fused layers."""

    # checkpoint sub-name -> (module sub-name, shard)
    FUSED = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up"),
    }
    RENAMED: dict[str, str] = {}
    """Checkpoint module names that this model calls otherwise."""

    def __init__(self, config: ModelConfig, max_positions: int, options: LayerOptions) -> None:
        super().__init__()
        self.config = config
        self.rotary = RotaryEmbedding(config.head_dim, max_positions, config.rope_theta, config.rope_scaling)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, options)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, options, self.make_mlp(config, i, options))
                                    for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, options.dtype)
        self.lm_head = self.embed_tokens if config.tie_word_embeddings else VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, options)
        self.logits_head = LogitsHead(self.lm_head, options.quant, tied=config.tie_word_embeddings)
        self.fused_decode: FusedDecodeLayers | None = None
        """Set by enable_fused_decode: steps whose tokens all attend as one-query rows then run the
        layers as one C++ call, unless the step must stop between layers (core lending)."""

    def make_mlp(self, config: ModelConfig, layer_index: int, options: LayerOptions) -> nn.Module:
        """The feed-forward block of layer `layer_index`."""
        return GatedMLP(config.hidden_size, config.intermediate_size, options)

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """token_ids, positions [T] -> final hidden states [T, hidden]."""
        x = self.embed_tokens(token_ids)
        rope = self.rotary.cos_sin(positions, x.dtype)
        if (self.fused_decode is not None and ctx.between_layers is None
                and self.fused_decode.applies_to(ctx.attention, x.shape[0])):
            x, residual = self.fused_decode(x, rope, ctx.attention, ctx.kv_caches)
        else:
            residual = None
            for layer, kv_cache in zip(self.layers, ctx.kv_caches):
                x, residual = layer(rope, x, residual, kv_cache, ctx.attention)
                if ctx.between_layers is not None:
                    ctx.between_layers()
        return self.norm(x, residual)[0]

    def enable_fused_decode(self, decode_backend: str) -> bool:
        """After loading: run decode-only steps through one C++ op where it applies (fused_decode.py).
        Returns whether it does."""
        self.fused_decode = FusedDecodeLayers.build(self, decode_backend)
        return self.fused_decode is not None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden [S, hidden] -> logits [S, vocab] in fp32 on rank 0; None on the other ranks."""
        return self.logits_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load Hugging Face-named tensors; every parameter must be covered exactly."""
        load_model_weights(self, weights, self.FUSED, self.RENAMED, self.config.tie_word_embeddings)
