"""The model runner: owns the model, its KV cache and the sampler; runs one scheduled step.

With tensor parallelism every rank has one: each holds its share of the weights and of the KV heads,
runs every step on the same inputs, and only rank 0's samples (the others get no logits).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import torch

from scalellm.config import EngineConfig
from scalellm.engine.device import resolve_kv_dtype
from scalellm.engine.loader.base import ModelFiles
from scalellm.engine.layers.attention import resolve_decode_backend, row_chunk_limit
from scalellm.engine.layers.options import LayerOptions
from scalellm.engine.layers.partition import max_local_kv_heads, partition_heads
from scalellm.engine.models import ForwardContext, model_class
from scalellm.engine.parallel.group import ParallelGroup, SingleRank
from scalellm.engine.quantization import get_quantization_method, resolve_quantization
from scalellm.engine.outputs import ModelRunnerOutput, SchedulerOutput
from scalellm.engine.sampler import Sampler, SamplingRow, make_generator
from scalellm.engine.sampling.random_draw import position_seed
from scalellm.engine.step_inputs import build_step_inputs
from scalellm.engine.outputs import ScheduledChunk
from scalellm.engine.kv_cache.groups import block_bytes, kv_groups, layer_slots


class ModelRunner:
    """Builds this rank's share of the model from `files`, allocates the paged KV cache, and executes steps."""

    def __init__(self, config: EngineConfig, files: ModelFiles, max_model_len: int,
                 device: torch.device, dtype: torch.dtype, group: ParallelGroup | None = None) -> None:
        self.config = config
        self.model_config = c = files.config
        self.device, self.dtype = device, dtype
        self.group = group or SingleRank()
        self.block_size = config.block_size
        self.decode_backend = resolve_decode_backend(config.attention_backend, device, dtype)
        self.row_chunk_limit = row_chunk_limit(self.decode_backend, c.head_dim)
        self.num_kv_heads = partition_heads(c.num_heads, c.num_kv_heads, self.group.world_size,
                                            self.group.rank).kv.size
        self.quantization = resolve_quantization(config.quantization, files, device, self.group.world_size, dtype)
        self.kv_dtype = resolve_kv_dtype(config.kv_cache_dtype, dtype, self.quantization, device)
        self.weights = (f"quantization {self.quantization}, dtype {str(dtype).removeprefix('torch.')}, "
                        f"kv cache {str(self.kv_dtype).removeprefix('torch.')}")
        quant = get_quantization_method(self.quantization)
        options = LayerOptions(dtype, quant, self.group, config.enable_expert_parallel)
        with torch.device(device):
            self.model = model_class(c.architecture)(c, max_model_len, options)
        self.model.load_weights(files.iter_weights(getattr(quant, "keeps_gguf_types", ())))
        self.model.eval()
        if config.fused_decode:
            self.model.enable_fused_decode(self.decode_backend)
        self.kv_groups = kv_groups(c)
        self.group_windows = tuple(g.sliding_window for g in self.kv_groups)
        self.num_blocks = self._num_blocks(config.kv_cache_gib)
        self.kv_caches = self._allocate_kv_cache(self.num_blocks)
        self.sampler = Sampler(config.seed)
        self._generators: dict[str, torch.Generator] = {}

    def _bytes_per_block(self) -> int:
        """On the rank with the most KV heads: every rank then fits the same number of blocks."""
        c = self.model_config
        num_kv_heads = max_local_kv_heads(c.num_heads, c.num_kv_heads, self.group.world_size)
        return block_bytes(self.kv_groups, self.block_size, num_kv_heads, c.head_dim, self.kv_dtype)

    def _num_blocks(self, kv_cache_gib: float) -> int:
        num_blocks = int(kv_cache_gib * (1 << 30)) // self._bytes_per_block()
        if num_blocks < 2:
            raise ValueError(f"kv_cache_gib={kv_cache_gib} holds fewer than 2 KV blocks for this model")
        return num_blocks

    def _allocate_kv_cache(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (K, V) [slots, KH, D].

        The C++ decode kernel and the prefill path read only slots already written, so on the CPU the
        cache is left uninitialized and its pages become resident as they are used. The torch decode
        path reads whole blocks (masking the unwritten tail), which must hold finite values: zeros.
        """
        c = self.model_config
        shape = (num_blocks * self.block_size, self.num_kv_heads, c.head_dim)  # [slots, KH on this rank, D]
        allocate = torch.empty if self.decode_backend == "cpp" else torch.zeros
        pairs = [(allocate(shape, dtype=self.kv_dtype, device=self.device),
                  allocate(shape, dtype=self.kv_dtype, device=self.device)) for _ in self.kv_groups[0].layers]
        _, pair_of = layer_slots(self.kv_groups)  # layers of different groups share a pair, in different blocks
        return [pairs[pair_of[layer]] for layer in range(c.num_layers)]

    @torch.inference_mode()
    def execute(self, scheduled: SchedulerOutput, between_layers: Callable[[], None] | None = None
                ) -> ModelRunnerOutput:
        """Run the forward pass for the scheduled chunks and sample where a chunk reaches its end
        (on rank 0; the other ranks return no tokens). `between_layers`: see ForwardContext."""
        inputs = build_step_inputs(scheduled, self.block_size, self.group_windows, self.device, self.decode_backend,
                                   self.row_chunk_limit)
        ctx = self._context(inputs, self.kv_caches)
        ctx.between_layers = between_layers
        hidden = self.model(inputs.token_ids, inputs.positions, ctx)  # [T, hidden]
        output = ModelRunnerOutput()
        if not inputs.sample_chunks:
            return output
        logits = self.model.compute_logits(hidden[inputs.sample_indices])  # [S, V] on rank 0, else None
        if logits is None:
            return output
        rows = [self._sampling_row(chunk.request) for chunk in inputs.sample_chunks]
        sampled = self.sampler(logits, rows)
        for chunk, token_id, logprobs in zip(inputs.sample_chunks, sampled.token_ids, sampled.logprobs):
            output.sampled_token_ids[chunk.request.request_id] = token_id
            if logprobs is not None:
                output.logprobs[chunk.request.request_id] = logprobs
        return output

    def _sampling_row(self, request) -> SamplingRow:
        params = request.sampling_params
        generator = None
        if params.seed is not None and not params.greedy:  # re-seeded per position: see random_draw.py
            generator = self._generators.get(request.request_id)
            if generator is None:
                generator = self._generators[request.request_id] = make_generator(0, self.device)
            generator.manual_seed(position_seed(params.seed, request.sample_index, request.num_output_tokens))
        return SamplingRow(params, request.prompt_token_ids, request.output_token_ids, generator, request.grammar)

    @torch.inference_mode()
    def score(self, token_ids: list[int]) -> torch.Tensor | None:
        """log p(t_i | t_<i) for i = 1..n-1 [n-1], from one forward pass over a private KV cache
        (None on ranks other than 0).

        For quality checks (perplexity), with a cache of the engine's KV dtype; the engine's own cache and
        scheduler are not touched.
        """
        num = len(token_ids)
        if num < 2:
            raise ValueError("scoring needs at least 2 tokens")
        c = self.model_config
        shape = (num, self.num_kv_heads, c.head_dim)
        caches = [(torch.zeros(shape, dtype=self.kv_dtype, device=self.device),
                   torch.zeros(shape, dtype=self.kv_dtype, device=self.device)) for _ in range(c.num_layers)]
        slots = torch.arange(num, device=self.device)
        # one prefill chunk over a private cache of block size 1: slot i holds position i
        tokens_only = SimpleNamespace(all_token_ids=token_ids, num_tokens=num)
        windows = (None, c.sliding_window) if c.has_mixed_attention else (c.sliding_window,)
        table = [i for i in range(num) for _ in windows]  # both groups' tables are the identity
        chunk = ScheduledChunk(tokens_only, start_position=0, num_new_tokens=num, block_ids=table)
        inputs = build_step_inputs(SchedulerOutput(chunks=[chunk]), 1, windows, self.device)
        layer_attention = None
        if c.has_mixed_attention:  # every layer writes its own private cache: one table serves both kinds
            layer_attention = [inputs.attention[int(c.is_sliding(i))] for i in range(c.num_layers)]
        ctx = ForwardContext(attention=inputs.attention[0], kv_caches=caches, layer_attention=layer_attention)
        hidden = self.model(inputs.token_ids, slots, ctx)  # [n, hidden]
        tokens = inputs.token_ids
        logits = self.model.compute_logits(hidden[:-1])  # [n-1, V] on rank 0
        if logits is None:
            return None
        logprobs = torch.log_softmax(logits, dim=-1)
        return logprobs.gather(1, tokens[1:, None]).squeeze(1)

    def _context(self, inputs, kv_caches) -> ForwardContext:
        """The forward context: one metadata for every layer, or per layer its KV group's."""
        if len(inputs.attention) == 1:
            return ForwardContext(attention=inputs.attention[0], kv_caches=kv_caches)
        group_of, _ = layer_slots(self.kv_groups)
        return ForwardContext(attention=inputs.attention[0], kv_caches=kv_caches,
                              layer_attention=[inputs.attention[g] for g in group_of])

    def release(self, request_ids) -> None:
        """Forget per-request state (seeded generators) of finished requests."""
        for request_id in request_ids:
            self._generators.pop(request_id, None)
