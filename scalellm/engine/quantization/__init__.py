"""Quantization methods by name."""

from __future__ import annotations

from scalellm.engine.quantization.base import QuantizationMethod
from scalellm.engine.quantization.int8 import Int8Dynamic
from scalellm.engine.quantization.unquantized import Unquantized

QUANTIZATION_METHODS: dict[str, type[QuantizationMethod]] = {
    "none": Unquantized,
    "int8": Int8Dynamic,
}

__all__ = ["QuantizationMethod", "QUANTIZATION_METHODS", "get_quantization_method"]


def get_quantization_method(name: str | None) -> QuantizationMethod:
    try:
        return QUANTIZATION_METHODS[name or "none"]()
    except KeyError:
        raise ValueError(f"unknown quantization {name!r}; choose from {', '.join(QUANTIZATION_METHODS)}") from None
