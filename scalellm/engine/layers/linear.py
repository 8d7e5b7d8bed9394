"""Linear and embedding layers that load their own weights (whole or as one shard of a merged matrix)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scalellm.engine.quantization import QuantizationMethod, get_quantization_method


class Linear(nn.Module):
    """y = x W^T + b. Merged projections (qkv, gate_up) name their row slices with `shard_sizes`."""

    def __init__(self, in_features: int, out_features: int | list[int], bias: bool = False,
                 shard_names: list[str] | None = None, dtype: torch.dtype = torch.float32,
                 quant_method: QuantizationMethod | None = None) -> None:
        super().__init__()
        self.quant_method = quant_method or get_quantization_method(None)
        sizes = out_features if isinstance(out_features, list) else [out_features]
        names = shard_names or [None]
        if len(names) != len(sizes):
            raise ValueError("one shard name per output size")
        self.shard_offsets = {}
        offset = 0
        for name, size in zip(names, sizes):
            self.shard_offsets[name] = (offset, size)
            offset += size
        self.weight = nn.Parameter(torch.empty(offset, in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(offset, dtype=dtype), requires_grad=False) if bias else None

    def load(self, tensor: torch.Tensor, shard: str | None = None, kind: str = "weight") -> None:
        """Copy a checkpoint tensor into the rows of `shard` (None: the whole matrix)."""
        target = self.weight if kind == "weight" else self.bias
        start, size = self.shard_offsets[shard]
        if tensor.shape[0] != size or tensor.shape[1:] != target.shape[1:]:
            raise ValueError(f"weight shape {tuple(tensor.shape)} does not fit shard {shard!r} "
                             f"of size {size} x {tuple(target.shape[1:])}")
        target.data[start:start + size].copy_(tensor)

    def process_weights_after_loading(self) -> None:
        self.quant_method.process_weights_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x)


class Embedding(nn.Module):
    """Token embedding; also serves as the output head when embeddings are tied."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=dtype), requires_grad=False)

    def load(self, tensor: torch.Tensor, shard: str | None = None, kind: str = "weight") -> None:
        if tensor.shape != self.weight.shape:
            raise ValueError(f"embedding shape {tuple(tensor.shape)} != {tuple(self.weight.shape)}")
        self.weight.data.copy_(tensor)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.weight)


class LogitsHead(nn.Module):
    """hidden -> logits with the output matrix (the embedding's when tied), in the model's quantization.

    The embedding itself stays unquantized (it is a lookup); a quantized head keeps its own copy.
    """

    def __init__(self, embedding: Embedding, quant_method: QuantizationMethod | None = None) -> None:
        super().__init__()
        self.embedding = embedding
        self.quant_method = quant_method or get_quantization_method(None)
        self.bias = None

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    def process_weights_after_loading(self) -> None:
        if self.quant_method.name == "none":
            return
        holder = nn.Module()
        holder.weight = nn.Parameter(self.embedding.weight.data, requires_grad=False)
        holder.bias = None
        self.quant_method.process_weights_after_loading(holder)
        self.quantized = holder

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, H] -> logits [S, V] in fp32."""
        if self.quant_method.name == "none":
            return F.linear(hidden, self.embedding.weight).float()
        return self.quant_method.apply(self.quantized, hidden.float()).float()
