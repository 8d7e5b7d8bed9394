"""The gated (SwiGLU) feed-forward block of the Llama family, sharded over the intermediate dimension.

    x [T, H] ─ gate_up (column-parallel, rows I_r of gate and of up) ─ silu(gate) * up [T, I_r]
             ─ down (row-parallel, columns I_r) ─ partial [T, H] ─ all-reduce ─ [T, H]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scalellm.engine.layers.kernels import FUSED_DTYPES, load_norm_rotary
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
        self.fused_silu_and_mul = None
        """float32 or bfloat16 on the CPU: one C++ op for silu(gate) * up (kernels/norm_rotary.cpp)."""
        if options.dtype in FUSED_DTYPES:
            ops = load_norm_rotary()
            self.fused_silu_and_mul = ops.silu_and_mul if ops is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [T, 2 I_r]: gate, then up
        if self.fused_silu_and_mul is not None and gate_up.dtype in FUSED_DTYPES and gate_up.device.type == "cpu":
            return self.down_proj(self.fused_silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
