"""What every layer of a model is built with; model files pass it down unchanged."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from scalellm.engine.parallel.group import ParallelGroup, SingleRank
from scalellm.engine.quantization import QuantizationMethod, get_quantization_method


@dataclass(frozen=True)
class LayerOptions:
    """The dtype, the quantization method and the parallel group of a model's layers."""

    dtype: torch.dtype = torch.float32
    quant: QuantizationMethod = field(default_factory=lambda: get_quantization_method(None))
    """How linear layers store and apply their weights (embeddings, norms and MoE routers stay in dtype)."""
    group: ParallelGroup = field(default_factory=SingleRank)
    """The tensor-parallel group: linear layers, embeddings and experts keep this rank's share."""
    expert_parallel: bool = False
    """MoE layers give each rank whole experts instead of a slice of every expert."""

    @property
    def rank(self) -> int:
        return self.group.rank

    @property
    def world_size(self) -> int:
        return self.group.world_size
