"""The quantization-method contract: how a linear layer's weights are stored and applied."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class QuantizationMethod(ABC):
    """Owns the storage format of a linear layer's weight.

    The layer loads its checkpoint weight in floating point first (so sharded and merged loading
    stay in one place); `process_weights_after_loading` then converts it to the method's format,
    and `apply` computes y = x W^T + b from that format.
    """

    name: str

    @abstractmethod
    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Convert layer.weight (float, [out, in]) into the method's own tensors on the layer."""

    @abstractmethod
    def apply(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] -> [T, out] in x's dtype."""
