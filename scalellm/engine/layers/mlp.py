"""The gated (SwiGLU) feed-forward block of the Llama family, sharded over the intermediate dimension.

    x [T, H] ─ gate_up (column-parallel, rows I_r of gate and of up) ─ silu(gate) * up [T, I_r]
             ─ down (row-parallel, columns I_r) ─ partial [T, H] ─ all-reduce ─ [T, H]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scalellm.engine.layers.linear import ColumnParallelLinear, RowParallelLinear
from scalellm.engine.layers.options import LayerOptions
from scalellm.engine.layers.partition import Slice, balanced_slice


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); this rank keeps `rows` of the intermediate dimension (default: its
    balanced share). reduce_results=False returns the partial sum (a MoE expert's contribution)."""

    def __init__(self, hidden_size: int, intermediate_size: int, options: LayerOptions,
                 rows: Slice | None = None, reduce_results: bool = True) -> None:
        super().__init__()
        rows = rows or balanced_slice(intermediate_size, options.world_size, options.rank)
        self.gate_up_proj = ColumnParallelLinear(hidden_size, [intermediate_size, intermediate_size], options,
                                                 shard_names=["gate", "up"], rows=rows)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, options, input_slice=rows,
                                           reduce_results=reduce_results)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [T, I_r] each
        return self.down_proj(F.silu(gate) * up)
