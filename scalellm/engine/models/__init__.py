"""Model architectures by name (the registry the loader's ModelConfig.architecture indexes)."""

from __future__ import annotations

from torch import nn

from scalellm.engine.loader.model_config import ModelLoadError
from scalellm.engine.models.gemma3 import Gemma3ForCausalLM
from scalellm.engine.models.llama import ForwardContext, LlamaForCausalLM
from scalellm.engine.models.mixtral import MixtralForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "mixtral": MixtralForCausalLM,
    "qwen2_moe": MixtralForCausalLM,
    "gemma3": Gemma3ForCausalLM,
}

__all__ = ["MODEL_REGISTRY", "ForwardContext", "model_class"]


def model_class(architecture: str) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ModelLoadError(f"no model implementation for architecture {architecture!r}") from None
