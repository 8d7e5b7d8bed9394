"""Mixture-of-experts members of the Llama family: Mixtral and Qwen2-MoE.

Both are Llama (attention, norms, rotary, embeddings) with the feed-forward block replaced by a sparse
mixture of experts (layers/moe.py, which also spreads the experts over the ranks):

    Mixtral     top-2 of 8 SwiGLU experts, routing weights renormalized;
                checkpoint names block_sparse_moe.gate, block_sparse_moe.experts.N.{w1 gate, w3 up, w2 down}
    Qwen2-MoE   top-k of E experts (renormalized if norm_topk_prob) plus a shared expert gated per
                token by a sigmoid; layers listed in mlp_only_layers (or off decoder_sparse_step) dense;
                q/k/v biases; checkpoint names mlp.gate, mlp.experts.N.{gate,up,down}_proj, mlp.shared_expert*
"""

from __future__ import annotations

from torch import nn

from scalellm.engine.layers.mlp import GatedMLP
from scalellm.engine.layers.moe import SparseMoeBlock
from scalellm.engine.layers.options import LayerOptions
from scalellm.engine.loader.model_config import ModelConfig
from scalellm.engine.models.llama import LlamaForCausalLM


class MixtralForCausalLM(LlamaForCausalLM):
    """Mixtral and Qwen2-MoE: the checkpoint names of both map onto the same modules."""

    FUSED = {
        **LlamaForCausalLM.FUSED,
        "w1": ("gate_up_proj", "gate"), "w3": ("gate_up_proj", "up"), "w2": ("down_proj", None),
    }
    RENAMED = {"block_sparse_moe": "mlp"}

    def make_mlp(self, config: ModelConfig, layer_index: int, options: LayerOptions) -> nn.Module:
        moe = config.moe
        if moe is None or layer_index in moe.dense_layers:
            return GatedMLP(config.hidden_size, config.intermediate_size, options)
        return SparseMoeBlock(config.hidden_size, moe.num_experts, moe.num_experts_per_token, moe.intermediate_size,
                              options, renormalize=moe.renormalize,
                              shared_intermediate_size=moe.shared_intermediate_size)
