"""Linear layers that load their own weights: whole, or this rank's slice of a checkpoint tensor.

A layer is described by the checkpoint's full sizes and the slices this rank keeps; `load` receives the
full checkpoint tensor and copies the slice, so model files never do sharding arithmetic. Merged
projections (qkv, gate_up) stack one slice per checkpoint tensor ("shard"):

    checkpoint q [H*D, K], k [KH*D, K], v [KH*D, K]          (rank r of a 2-rank group)
    qkv_proj.weight = [ q[r's heads] ; k[r's kv heads] ; v[r's kv heads] ]   [(h + 2 kh) * D, K]

    ColumnParallelLinear   each rank computes a slice of the outputs; no communication
    RowParallelLinear      each rank reads a slice of the inputs; the partial outputs are all-reduced
"""

from __future__ import annotations

import torch
from torch import nn

from scalellm.engine.layers.options import LayerOptions
from scalellm.engine.layers.partition import Slice, balanced_slice, partition_heads
from scalellm.engine.quantization import QuantizationMethod, get_quantization_method
from scalellm.engine.quantization.gguf import GGUFTensor


class Linear(nn.Module):
    """y = x W^T + b, replicated on every rank unless slices are given.

    `in_features` and `out_features` are the checkpoint's sizes; `input_slice` and `output_slices`
    (one per shard) pick what this layer keeps (default: everything).
    """

    def __init__(self, in_features: int, out_features: int | list[int], bias: bool = False,
                 shard_names: list[str] | None = None, dtype: torch.dtype = torch.float32,
                 quant_method: QuantizationMethod | None = None, *, input_slice: Slice | None = None,
                 output_slices: list[Slice] | None = None) -> None:
        super().__init__()
        self.quant_method = quant_method or get_quantization_method(None)
        sizes = out_features if isinstance(out_features, list) else [out_features]
        names = shard_names or [None]
        slices = output_slices or [Slice.whole(size) for size in sizes]
        if not len(names) == len(sizes) == len(slices):
            raise ValueError("one shard name and one output slice per output size")
        if any(s.total != size for s, size in zip(slices, sizes)):
            raise ValueError("output slices must cover the output sizes")
        self.input_slice = input_slice or Slice.whole(in_features)
        self.shards: dict[str | None, tuple[int, Slice]] = {}
        """shard name -> (first row in this layer's weight, rows of the checkpoint tensor it keeps)."""
        offset = 0
        for name, piece in zip(names, slices):
            self.shards[name] = (offset, piece)
            offset += piece.size
        self.weight = nn.Parameter(torch.empty(offset, self.input_slice.size, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(offset, dtype=dtype), requires_grad=False) if bias else None
        self.gguf_shards: dict[str | None, GGUFTensor] = {}
        """Shards loaded still in their GGUF quantization (methods with `keeps_gguf_types` only)."""

    def load(self, tensor: torch.Tensor, shard: str | None = None, kind: str = "weight") -> None:
        """Copy this layer's slice of a full checkpoint tensor into the rows of `shard`."""
        offset, rows = self.shards[shard]
        expected = (rows.total, self.input_slice.total) if kind == "weight" else (rows.total,)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{kind} shape {tuple(tensor.shape)} does not fit shard {shard!r} of shape {expected}")
        if isinstance(tensor, GGUFTensor):
            whole_rows = self.input_slice.size == self.input_slice.total
            if whole_rows and tensor.type_name in getattr(self.quant_method, "keeps_gguf_types", ()):
                self.gguf_shards[shard] = tensor.rows(slice(rows.start, rows.end))  # the method packs them
                return
            tensor = tensor.dequantize()
        tensor = tensor[rows.start:rows.end]
        if kind == "weight":
            tensor = tensor[:, self.input_slice.start:self.input_slice.end]
            self.weight.data[offset:offset + rows.size].copy_(tensor)
        else:
            self.bias.data[offset:offset + rows.size].copy_(self._local_bias(tensor))

    def _local_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias

    def checkpoint_keys(self) -> list[tuple[str | None, str]]:
        """(shard, kind) of every checkpoint tensor this layer must be loaded from."""
        kinds = ("weight", "bias") if self.bias is not None else ("weight",)
        return [(name, kind) for name in self.shards for kind in kinds]

    def process_weights_after_loading(self) -> None:
        self.quant_method.process_weights_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x)


class ColumnParallelLinear(Linear):
    """Output rows split over the group, each shard on its own (gate and up alike); no communication.

    `rows` overrides the balanced split with the same rows of every shard (a MoE expert's slice).
    """

    def __init__(self, in_features: int, out_features: int | list[int], options: LayerOptions,
                 bias: bool = False, shard_names: list[str] | None = None, rows: Slice | None = None) -> None:
        sizes = out_features if isinstance(out_features, list) else [out_features]
        slices = [rows or balanced_slice(size, options.world_size, options.rank) for size in sizes]
        super().__init__(in_features, out_features, bias, shard_names, options.dtype, options.quant,
                         output_slices=slices)


class QKVParallelLinear(Linear):
    """The fused q, k, v projection; each rank keeps whole heads (see layers/partition.py)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 options: LayerOptions, bias: bool = False) -> None:
        heads = partition_heads(num_heads, num_kv_heads, options.world_size, options.rank)
        q_rows, kv_rows = heads.q.scaled(head_dim), heads.kv.scaled(head_dim)
        super().__init__(hidden_size, [q_rows.total, kv_rows.total, kv_rows.total], bias, ["q", "k", "v"],
                         options.dtype, options.quant, output_slices=[q_rows, kv_rows, kv_rows])
        self.num_local_heads, self.num_local_kv_heads = heads.q.size, heads.kv.size
        self.q_columns = q_rows
        """The attention output columns this rank produces: the o projection's input slice."""


class RowParallelLinear(Linear):
    """Input columns split over the group; the partial products are summed with one all-reduce.

    The bias is added once: rank 0 keeps it, the other ranks a zero bias.
    With reduce_results=False the caller sums the partial outputs (to fuse several into one all-reduce).
    """

    def __init__(self, in_features: int, out_features: int, options: LayerOptions, bias: bool = False,
                 input_slice: Slice | None = None, reduce_results: bool = True) -> None:
        super().__init__(in_features, out_features, bias, None, options.dtype, options.quant,
                         input_slice=input_slice or balanced_slice(in_features, options.world_size, options.rank))
        self.group = options.group
        self.reduce_results = reduce_results

    def _local_bias(self, bias: torch.Tensor) -> torch.Tensor:
        return bias if self.group.rank == 0 else torch.zeros_like(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in / world] -> [T, out] (summed over the ranks unless reduce_results is False)."""
        out = self.quant_method.apply(self, x)
        return self.group.all_reduce(out) if self.reduce_results else out
