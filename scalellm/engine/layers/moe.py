"""Sparse mixture of experts (Mixtral, Qwen2-MoE): a router picks the top-k SwiGLU experts of each token.

Experts are spread over the tensor-parallel group in one of two ways:

    tensor parallel (default)                 expert parallel (LayerOptions.expert_parallel)
    rank r: every expert, intermediate        rank r: experts balanced_slice(E, w, r), whole
            rows balanced_slice(I, w, r)

Attention's output is all-reduced, so every rank holds every token's hidden state. Dispatch is then a
local selection (a rank runs the tokens routed to the experts it holds) and the combine is one
all-reduce of the partial outputs, in both layouts:

    x [T, H] ─ router ─ top-k (expert ids, weights) [T, k]
             ─ sum over (token, slot) routed here of weight * expert(x[token]) ─ partial [T, H]
             (+ sigmoid(shared_gate(x)) * shared_expert(x), its tensor-parallel partial)
             ─ all-reduce ─ [T, H]
"""

from __future__ import annotations

import torch
from torch import nn

from scalellm.engine.layers.linear import Linear
from scalellm.engine.layers.mlp import GatedMLP
from scalellm.engine.layers.options import LayerOptions
from scalellm.engine.layers.partition import Slice, balanced_slice


class SparseMoeBlock(nn.Module):
    """Router, experts (this rank's share, named by their global ids) and an optional shared expert.

    renormalize: the top-k weights are divided by their sum (Mixtral; Qwen2-MoE's norm_topk_prob).
    shared_intermediate_size > 0 adds Qwen2-MoE's shared expert with its per-token sigmoid gate.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int,
                 options: LayerOptions, renormalize: bool = True, shared_intermediate_size: int = 0) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top-k {top_k} must be between 1 and the number of experts {num_experts}")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.group = options.group
        self.gate = Linear(hidden_size, num_experts, dtype=options.dtype)  # the router: replicated, unquantized
        if options.expert_parallel:
            self.local_experts = balanced_slice(num_experts, options.world_size, options.rank)
            rows = Slice.whole(intermediate_size)
        else:
            self.local_experts = Slice.whole(num_experts)
            rows = balanced_slice(intermediate_size, options.world_size, options.rank)
        self.experts = nn.ModuleDict({
            str(e): GatedMLP(hidden_size, intermediate_size, options, rows=rows, reduce_results=False)
            for e in range(self.local_experts.start, self.local_experts.end)})
        self.shared_expert = self.shared_expert_gate = None
        if shared_intermediate_size:
            self.shared_expert = GatedMLP(hidden_size, shared_intermediate_size, options, reduce_results=False)
            self.shared_expert_gate = Linear(hidden_size, 1, dtype=options.dtype)

    def holds_expert(self, expert_id: int) -> bool:
        """False for an expert another rank holds (its checkpoint tensors are skipped here)."""
        return self.local_experts.start <= expert_id < self.local_experts.end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H]."""
        probs = torch.softmax(self.gate(x).float(), dim=-1)  # [T, E]
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)  # [T, k]
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = self._run_local_experts(x, weights, expert_ids)  # [T, H], this rank's partial sum
        if self.shared_expert is not None:
            out += torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return self.group.all_reduce(out)

    def _run_local_experts(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Each local expert on the tokens routed to it; slots sorted by expert so each reads one run.

            expert_ids [T, k] ─ flatten, stable sort ─ slots of expert 0 | slots of expert 1 | ...
        """
        flat_ids = expert_ids.flatten()  # [T * k]
        order = torch.argsort(flat_ids, stable=True)
        token_of_slot = order // self.top_k  # [T * k]
        slot_weights = weights.flatten()[order]  # [T * k]
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        start = sum(counts[:self.local_experts.start])
        out = torch.zeros_like(x)
        for expert_id in range(self.local_experts.start, self.local_experts.end):
            end = start + counts[expert_id]
            if end > start:
                tokens = token_of_slot[start:end]  # [n]
                expert_out = self.experts[str(expert_id)](x[tokens])  # [n, H]
                out.index_add_(0, tokens, (expert_out * slot_weights[start:end, None]).to(x.dtype))
            start = end
        return out
