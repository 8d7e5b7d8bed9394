"""The vocabulary-parallel token embedding and output head.

The vocabulary is split over the group in equal runs of ceil(V / w) rows, the last one padded with
zero rows, so every rank's logits have the same width and gather into one tensor:

    V = 10, w = 4, 3 rows each:   rank 0 [0, 3)   rank 1 [3, 6)   rank 2 [6, 9)   rank 3 [9, 10) + 2 padding

Embedding: each rank looks up the tokens in its run (zeros for the others) and an all-reduce sums them.
Head: each rank computes its run's logits; rank 0 gathers them and drops the padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scalellm.engine.layers.options import LayerOptions
from scalellm.engine.quantization import QuantizationMethod, get_quantization_method
from scalellm.engine.quantization.gguf import GGUFTensor


class VocabParallelEmbedding(nn.Module):
    """Token embedding; also holds the output matrix (the head reads its weight)."""

    def __init__(self, vocab_size: int, hidden_size: int, options: LayerOptions) -> None:
        super().__init__()
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.group = options.group
        self.rows_per_rank = -(-vocab_size // options.world_size)
        self.vocab_start = min(vocab_size, options.rank * self.rows_per_rank)
        self.num_local_rows = min(vocab_size, self.vocab_start + self.rows_per_rank) - self.vocab_start
        self.weight = nn.Parameter(torch.zeros(self.rows_per_rank, hidden_size, dtype=options.dtype),
                                   requires_grad=False)  # [V / w, H], padding rows stay zero
        self.quant_method = options.quant
        self.gguf_weight: GGUFTensor | None = None
        """This rank's rows still in their GGUF quantization (quantization "gguf"); `weight` is then empty."""

    def load(self, tensor: torch.Tensor, shard: str | None = None, kind: str = "weight") -> None:
        """Copy this rank's rows of the full [V, H] checkpoint matrix."""
        if tuple(tensor.shape) != (self.vocab_size, self.hidden_size):
            raise ValueError(f"embedding shape {tuple(tensor.shape)} != {(self.vocab_size, self.hidden_size)}")
        if isinstance(tensor, GGUFTensor):
            if tensor.type_name in getattr(self.quant_method, "keeps_gguf_types", ()):
                # kept in the file's blocks: rows are dequantized as they are looked up
                self.gguf_weight = tensor.rows(slice(self.vocab_start, self.vocab_start + self.num_local_rows))
                self.weight = nn.Parameter(torch.empty(0, self.hidden_size, dtype=self.weight.dtype),
                                           requires_grad=False)
                return
            tensor = tensor.dequantize()
        rows = tensor[self.vocab_start:self.vocab_start + self.num_local_rows]
        self.weight.data[:self.num_local_rows].copy_(rows)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids [T] -> [T, H]."""
        if self.group.world_size == 1:
            return self._lookup(token_ids)
        local_ids = token_ids - self.vocab_start
        inside = (local_ids >= 0) & (local_ids < self.num_local_rows)  # [T]
        vectors = self._lookup(local_ids.masked_fill(~inside, 0))  # [T, H]
        return self.group.all_reduce(vectors.masked_fill_(~inside.unsqueeze(1), 0))


    def _lookup(self, local_ids: torch.Tensor) -> torch.Tensor:
        if self.gguf_weight is None:
            return F.embedding(local_ids, self.weight)
        rows = self.gguf_weight.rows(local_ids.cpu().numpy()).dequantize()  # [T, H] float32
        return rows.to(device=local_ids.device, dtype=self.weight.dtype)


class LogitsHead(nn.Module):
    """hidden -> logits with the output matrix (the embedding's when tied), in the model's quantization.

    The embedding itself stays unquantized (it is a lookup); a quantized head keeps its own copy of
    this rank's rows.
    """

    def __init__(self, embedding: VocabParallelEmbedding, quant_method: QuantizationMethod | None = None,
                 tied: bool = True) -> None:
        super().__init__()
        self.embedding = embedding
        self.tied = tied
        """False: `embedding` is the head's own matrix, never looked up (its file blocks are dropped once packed)."""
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
        holder.shards, holder.gguf_shards = {None: (0, None)}, {}
        if self.embedding.gguf_weight is not None:  # the file's blocks; a float matrix only for a fallback
            holder.weight = nn.Parameter(torch.empty(self.embedding.gguf_weight.shape, dtype=self.embedding.weight.dtype),
                                         requires_grad=False)
            holder.gguf_shards = {None: self.embedding.gguf_weight}
        self.quant_method.process_weights_after_loading(holder)
        self.quantized = holder
        if not self.tied and getattr(holder, "weight", None) is None:
            self.embedding.gguf_weight = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden [S, H] -> logits [S, V] in fp32 on rank 0; None on the other ranks."""
        if self.quant_method.name == "none":
            logits = F.linear(hidden, self.embedding.weight).float()  # [S, V / w]
        else:
            logits = self.quant_method.apply(self.quantized, hidden.float()).float()
        logits = self.embedding.group.gather_to_first(logits, dim=1)  # [S, w * V / w] on rank 0
        if logits is None or logits.shape[1] == self.embedding.vocab_size:
            return logits
        return logits[:, :self.embedding.vocab_size]
