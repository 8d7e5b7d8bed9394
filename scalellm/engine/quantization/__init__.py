"""Quantization methods by name."""

from __future__ import annotations

import logging

import torch

from scalellm.engine.quantization.base import QuantizationMethod
from scalellm.engine.quantization.gguf import GGUFQuantized, kernel_isa
from scalellm.engine.quantization.gguf_blocks import KERNEL_TYPES
from scalellm.engine.quantization.int8 import Int8Dynamic
from scalellm.engine.quantization.unquantized import Unquantized

logger = logging.getLogger(__name__)

QUANTIZATION_METHODS: dict[str, type[QuantizationMethod]] = {
    "none": Unquantized,
    "int8": Int8Dynamic,
    "gguf": GGUFQuantized,
}

__all__ = ["QuantizationMethod", "QUANTIZATION_METHODS", "get_quantization_method", "resolve_quantization"]


def get_quantization_method(name: str | None) -> QuantizationMethod:
    try:
        return QUANTIZATION_METHODS[name or "none"]()  # "auto" is resolved first: resolve_quantization
    except KeyError:
        raise ValueError(f"unknown quantization {name!r}; choose from {', '.join(QUANTIZATION_METHODS)}") from None


def resolve_quantization(name: str | None, files, device: torch.device, tensor_parallel_size: int = 1,
                         dtype: torch.dtype = torch.float32) -> str:
    """The method "auto" (the default) stands for, given the model files and the machine.

    A GGUF whose linear weights are quantized keeps them ("gguf") on a CPU the kernel runs on
    (AVX512-VNNI or AVX2) and one rank; everything else keeps today's behaviour: weights in the model's dtype ("none"). Explicit
    names are returned unchanged. The choice is logged, with the dtype of unquantized weights.
    """
    if name not in (None, "auto"):
        return name
    if device.type == "cpu" and tensor_parallel_size == 1 and kernel_isa() and _quantized_gguf(files):
        logger.info("quantization auto: gguf (the file's quantized weights, %s kernel)", kernel_isa())
        return "gguf"
    logger.info("quantization auto: none (weights in %s)", str(dtype).removeprefix("torch."))
    return "none"


def _quantized_gguf(files) -> bool:
    """True for a GGUF file whose layer-0 q projection is of a type the quantized kernel reads."""
    header = getattr(files, "header", None)  # GGUFFiles' (loader/gguf_header.py)
    if header is None:
        return False
    return any(t.name == "blk.0.attn_q.weight" and t.tensor_type.name in KERNEL_TYPES for t in header.tensors)
