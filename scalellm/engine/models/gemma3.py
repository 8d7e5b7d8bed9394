"""Gemma 3 (text): the Gemma 3 technical report's decoder, as in Hugging Face's Gemma3ForCausalLM.

Per layer, with RMSNorms that scale by (1 + weight):

    x ─ input_norm ─ attention ─ post_attention_norm ─(+ x)─ pre_ffw_norm ─ MLP ─ post_ffw_norm ─(+)─▶

- attention: q/k RMSNorm per head before the rotary embedding; scores scaled by
  query_pre_attn_scalar ** -0.5; local layers attend within a sliding window with rope base 10k,
  global layers to the whole context with their own base (and rope scaling);
- MLP: down(gelu_tanh(gate(x)) * up(x));
- the embedding is multiplied by sqrt(hidden) (in the embedding's dtype); the output head is tied.

Which layers slide comes from ModelConfig.layer_types (gemma3_config.py); each layer reads the
attention metadata of its KV cache group (kv_cache/groups.py: local layers free blocks that fall
out of their window, so their blocks differ from the global layers').
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from scalellm.engine.layers.attention import AttentionMetadata, paged_attention
from scalellm.engine.layers.linear import QKVParallelLinear, RowParallelLinear
from scalellm.engine.layers.mlp import GatedMLP
from scalellm.engine.layers.options import LayerOptions
from scalellm.engine.layers.rotary import RotaryEmbedding, apply_rotary
from scalellm.engine.layers.vocab import LogitsHead, VocabParallelEmbedding
from scalellm.engine.loader.model_config import ModelConfig
from scalellm.engine.models.llama import ForwardContext, LlamaForCausalLM
from scalellm.engine.models.weight_loading import load_model_weights


class GemmaRMSNorm(nn.Module):
    """x / rms(x) * (1 + weight), in fp32, rounded to x's dtype at the end. The weight stays fp32:
    GGUF files store 1 + weight in fp32, and 1 + bf16(weight) would lose its low bits."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(size, dtype=torch.float32), requires_grad=False)

    def load(self, tensor: torch.Tensor, shard: str | None = None, kind: str = "weight") -> None:
        self.weight.data.copy_(tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight)).to(x.dtype)


class GeluTanhMLP(GatedMLP):
    """down(gelu_tanh(gate(x)) * up(x)): GatedMLP's sharding with Gemma's activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [T, I_r] each
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Gemma3Attention(nn.Module):
    def __init__(self, config: ModelConfig, options: LayerOptions) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(config.hidden_size, config.head_dim, config.num_heads, config.num_kv_heads,
                                          options, bias=config.attention_bias)
        self.o_proj = RowParallelLinear(config.num_heads * config.head_dim, config.hidden_size, options,
                                        input_slice=self.qkv_proj.q_columns)
        self.q_norm = GemmaRMSNorm(config.head_dim, config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(config.head_dim, config.rms_norm_eps)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_local_heads, self.qkv_proj.num_local_kv_heads
        self.head_dim = config.head_dim
        self.split = [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                      self.num_kv_heads * self.head_dim]
        # paged_attention scales by head_dim ** -0.5; Gemma by query_pre_attn_scalar ** -0.5
        scalar = config.query_pre_attn_scalar or config.head_dim
        self.query_scale = 1.0 if scalar == config.head_dim else (config.head_dim / scalar) ** 0.5

    def forward(self, rope, x: torch.Tensor, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q = apply_rotary(self.q_norm(q.reshape(num_tokens, self.num_heads, self.head_dim)), *rope)  # [T, H, D]
        k = apply_rotary(self.k_norm(k.reshape(num_tokens, self.num_kv_heads, self.head_dim)), *rope)  # [T, KH, D]
        if self.query_scale != 1.0:
            q = q * self.query_scale
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        out = paged_attention(q, k, v, kv_cache, meta)  # [T, H, D]
        return self.o_proj(out.reshape(num_tokens, -1))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, options: LayerOptions, layer_index: int) -> None:
        super().__init__()
        size, eps = config.hidden_size, config.rms_norm_eps
        self.sliding = config.is_sliding(layer_index)
        self.input_layernorm = GemmaRMSNorm(size, eps)
        self.self_attn = Gemma3Attention(config, options)
        self.post_attention_layernorm = GemmaRMSNorm(size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(size, eps)
        self.mlp = GeluTanhMLP(size, config.intermediate_size, options)
        self.post_feedforward_layernorm = GemmaRMSNorm(size, eps)

    def forward(self, rope, x: torch.Tensor, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        h = self.self_attn(rope, self.input_layernorm(x), kv_cache, meta)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(h)


class Gemma3ForCausalLM(nn.Module):
    """Checkpoint names follow Hugging Face's Gemma3ForCausalLM (GGUF names are mapped to them)."""

    FUSED = LlamaForCausalLM.FUSED

    def __init__(self, config: ModelConfig, max_positions: int, options: LayerOptions) -> None:
        super().__init__()
        self.config = config
        self.global_rotary = RotaryEmbedding(config.head_dim, max_positions, config.rope_theta, config.rope_scaling)
        self.local_rotary = RotaryEmbedding(config.head_dim, max_positions,
                                            config.local_rope_theta or config.rope_theta, {"rope_type": "default"})
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, options)
        self.embed_scale = config.hidden_size ** 0.5
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, options, i) for i in range(config.num_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = self.embed_tokens if config.tie_word_embeddings else VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, options)
        self.logits_head = LogitsHead(self.lm_head, options.quant)

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """token_ids, positions [T] -> final hidden states [T, hidden]."""
        x = self.embed_tokens(token_ids)  # [T, hidden]
        x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        ropes = {True: self.local_rotary.cos_sin(positions, x.dtype),
                 False: self.global_rotary.cos_sin(positions, x.dtype)}
        for index, (layer, kv_cache) in enumerate(zip(self.layers, ctx.kv_caches)):
            x = layer(ropes[layer.sliding], x, kv_cache, ctx.attention_for(index))
            if ctx.between_layers is not None:
                ctx.between_layers()
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden [S, hidden] -> logits [S, vocab] in fp32 on rank 0 (softcapped if the model says)."""
        logits = self.logits_head(hidden)
        cap = self.config.final_logit_softcapping
        if logits is not None and cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def enable_fused_decode(self, decode_backend: str) -> bool:
        """The fused decode layers are the Llama family's; Gemma 3 runs its Python layers."""
        return False

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_model_weights(self, weights, self.FUSED, {}, self.config.tie_word_embeddings)
