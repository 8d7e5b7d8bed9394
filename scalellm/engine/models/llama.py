"""The Llama family in one file: Llama 2/3, Mistral, Qwen2 (QKV bias); GQA; tied or untied embeddings.

Tokens of all requests in a step are flattened into one sequence [T]; attention separates them by the
metadata the model runner built. q/k/v and gate/up are fused into one matmul each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from scalellm.engine.layers.attention import AttentionMetadata, paged_attention
from scalellm.engine.layers.linear import Embedding, Linear, LogitsHead
from scalellm.engine.quantization import QuantizationMethod
from scalellm.engine.layers.norm import RMSNorm
from scalellm.engine.layers.rotary import RotaryEmbedding, apply_rotary
from scalellm.engine.loader.model_config import ModelConfig, ModelLoadError


@dataclass
class ForwardContext:
    """What one forward pass reads besides token ids and positions."""

    attention: AttentionMetadata
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    """Per layer: (k_cache, v_cache), each [num_slots, num_kv_heads, head_dim]."""


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, quant: QuantizationMethod) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, [q_size, kv_size, kv_size], bias=config.attention_bias,
                               shard_names=["q", "k", "v"], dtype=dtype, quant_method=quant)
        self.o_proj = Linear(q_size, config.hidden_size, dtype=dtype, quant_method=quant)
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


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, quant: QuantizationMethod) -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, [size, size], shard_names=["gate", "up"], dtype=dtype,
                                   quant_method=quant)
        self.down_proj = Linear(size, config.hidden_size, dtype=dtype, quant_method=quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, quant: QuantizationMethod) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(config, dtype, quant)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = LlamaMLP(config, dtype, quant)

    def forward(self, rope, x, kv_cache, meta) -> torch.Tensor:
        x = x + self.self_attn(rope, self.input_layernorm(x), kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    """Checkpoint names follow Hugging Face's; `load_weights` maps them onto the fused layers."""

    # checkpoint sub-name -> (module sub-name, shard)
    FUSED = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up"),
    }

    def __init__(self, config: ModelConfig, max_positions: int, dtype: torch.dtype,
                 quant: QuantizationMethod) -> None:
        super().__init__()
        self.config = config
        self.rotary = RotaryEmbedding(config.head_dim, max_positions, config.rope_theta, config.rope_scaling)
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, dtype, quant)
                                    for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.lm_head = self.embed_tokens if config.tie_word_embeddings else Embedding(
            config.vocab_size, config.hidden_size, dtype)
        self.logits_head = LogitsHead(self.lm_head, quant)

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """token_ids, positions [T] -> final hidden states [T, hidden]."""
        x = self.embed_tokens(token_ids)
        rope = self.rotary.cos_sin(positions, x.dtype)
        for layer, kv_cache in zip(self.layers, ctx.kv_caches):
            x = layer(rope, x, kv_cache, ctx.attention)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, hidden] -> logits [S, vocab] in fp32."""
        return self.logits_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load Hugging Face-named tensors; every parameter must be covered exactly."""
        modules = dict(self.named_modules())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            module_name, kind = name.rsplit(".", 1)
            module_name = module_name.removeprefix("model.")
            parent, _, leaf = module_name.rpartition(".")
            shard = None
            if leaf in self.FUSED:
                leaf, shard = self.FUSED[leaf]
                module_name = f"{parent}.{leaf}"
            module = modules.get(module_name)
            if module is None or not hasattr(module, "load"):
                raise ModelLoadError(f"unexpected weight {name} in the checkpoint")
            try:
                module.load(tensor, shard, kind)
            except ValueError as exc:
                raise ModelLoadError(f"weight {name}: {exc}") from None
            loaded.add(f"{module_name}.{kind}.{shard}")
        self._check_complete(loaded)
        for module in list(self.modules()):
            if isinstance(module, (Linear, LogitsHead)):
                module.process_weights_after_loading()

    def _check_complete(self, loaded: set[str]) -> None:
        expected = set()
        for name, module in self.named_modules():
            if isinstance(module, Linear):
                for shard in module.shard_offsets:
                    expected.add(f"{name}.weight.{shard}")
                    if module.bias is not None:
                        expected.add(f"{name}.bias.{shard}")
            elif isinstance(module, (Embedding, RMSNorm)) and not (
                    name == "lm_head" and self.config.tie_word_embeddings):
                expected.add(f"{name}.weight.None")
        missing = sorted(expected - loaded)
        if missing:
            raise ModelLoadError(f"the checkpoint lacks {len(missing)} weights, e.g. {missing[0]}")
