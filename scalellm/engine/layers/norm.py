"""RMSNorm, computed in fp32 like the reference implementation, optionally fused with the residual add."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scalellm.engine.layers.kernels import FUSED_DTYPES, load_norm_rotary


class RMSNorm(nn.Module):
    """y = weight * rmsnorm(x); with a residual: (rmsnorm(x + residual) * weight, x + residual).

    float32 and bfloat16 on the CPU run as one C++ op (kernels/norm_rotary.cpp) that rounds where the
    torch ops do (only its sum of squares is ordered otherwise); other dtypes keep the torch ops.
    """

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.fused = None
        if dtype in FUSED_DTYPES and self.weight.device.type == "cpu":
            ops = load_norm_rotary()
            self.fused = ops.add_rms_norm if ops is not None else None

    def load(self, tensor: torch.Tensor, shard: str | None = None, kind: str = "weight") -> None:
        self.weight.data.copy_(tensor)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x [T, H] -> normed [T, H]; with `residual` [T, H]: (normed x + residual, x + residual)."""
        if self.fused is not None and x.dtype == self.weight.dtype:
            normed, total = self.fused(x, residual, self.weight, self.eps)
            return normed if residual is None else (normed, total)
        if residual is None:
            return self._norm(x)
        total = x + residual
        return self._norm(total), total

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32, round to the model's dtype, then scale: the reference's order of operations.
        normed = F.rms_norm(x.float(), self.weight.shape, None, self.eps)
        return self.weight * normed.to(x.dtype)
