"""Weights kept in the model's dtype: a plain matrix multiply."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scalellm.engine.quantization.base import QuantizationMethod


class Unquantized(QuantizationMethod):
    name = "none"

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        pass

    def apply(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight, layer.bias)
