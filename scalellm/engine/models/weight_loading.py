"""Loading Hugging Face-named checkpoint tensors into a model whose layers load their own slices.

A checkpoint name is routed to (module, shard, kind); the module's `load` keeps what this rank holds:

    model.layers.3.self_attn.k_proj.weight           -> layers.3.self_attn.qkv_proj, shard "k", weight
    model.layers.3.block_sparse_moe.experts.5.w1.weight
        (renamed block_sparse_moe -> mlp, fused w1)  -> layers.3.mlp.experts.5.gate_up_proj, shard "gate"

Under expert parallelism a rank has no module for the experts other ranks hold; their tensors are
skipped. Every tensor a module declares must be loaded exactly (a missing one is a ModelLoadError).
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import torch
from torch import nn

from scalellm.engine.layers.moe import SparseMoeBlock
from scalellm.engine.loader.model_config import ModelLoadError

_EXPERT = re.compile(r"^(?P<block>.+)\.experts\.(?P<id>\d+)\.")


def load_model_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                       fused: dict[str, tuple[str, str | None]], renamed: dict[str, str],
                       tie_word_embeddings: bool) -> None:
    """fused: checkpoint leaf -> (module leaf, shard); renamed: checkpoint module -> this model's name."""
    modules = dict(model.named_modules())
    loaded: set[str] = set()
    for name, tensor in weights:
        if "rotary_emb" in name or (name == "lm_head.weight" and tie_word_embeddings):
            continue
        module_name, shard, kind = _route(name, fused, renamed)
        module = modules.get(module_name)
        if module is None and _held_by_another_rank(module_name, modules):
            continue
        if module is None or not hasattr(module, "load"):
            raise ModelLoadError(f"unexpected weight {name} in the checkpoint")
        try:
            module.load(tensor, shard, kind)
        except ValueError as exc:
            raise ModelLoadError(f"weight {name}: {exc}") from None
        loaded.add(f"{module_name}.{kind}.{shard}")
    _check_complete(modules, loaded)
    # Each module repacks only its own tensors, mostly in numpy, which leaves the GIL while it computes:
    # the modules go to the intra-op threads' number of workers.
    processed = [m for m in model.modules() if hasattr(m, "process_weights_after_loading")]
    with ThreadPoolExecutor(torch.get_num_threads(), thread_name_prefix="weights") as pool:
        for _ in pool.map(lambda module: module.process_weights_after_loading(), processed):
            pass


def _route(name: str, fused: dict[str, tuple[str, str | None]],
           renamed: dict[str, str]) -> tuple[str, str | None, str]:
    module_name, kind = name.rsplit(".", 1)
    parts = [renamed.get(part, part) for part in module_name.removeprefix("model.").split(".")]
    shard = None
    if parts[-1] in fused:
        parts[-1], shard = fused[parts[-1]]
    return ".".join(parts), shard, kind


def _held_by_another_rank(module_name: str, modules: dict[str, nn.Module]) -> bool:
    match = _EXPERT.match(module_name)
    if match is None:
        return False
    block = modules.get(match["block"])
    expert_id = int(match["id"])
    return (isinstance(block, SparseMoeBlock) and expert_id < block.num_experts
            and not block.holds_expert(expert_id))


def _check_complete(modules: dict[str, nn.Module], loaded: set[str]) -> None:
    expected = set()
    for name, module in modules.items():
        if not hasattr(module, "load"):
            continue
        keys = module.checkpoint_keys() if hasattr(module, "checkpoint_keys") else [(None, "weight")]
        expected.update(f"{name}.{kind}.{shard}" for shard, kind in keys)
    missing = sorted(expected - loaded)
    if missing:
        raise ModelLoadError(f"the checkpoint lacks {len(missing)} weights, e.g. {missing[0]}")
