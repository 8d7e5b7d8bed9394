"""The model-files interface: what every loader (Hugging Face directory, GGUF file) provides."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterator

import torch

from scalellm.engine.loader.model_config import ModelConfig


class ModelFiles(ABC):
    """A model on disk: its architecture, its weights under Hugging Face names, and its tokenizer.

    Loaders never execute code from the files: safetensors and GGUF only, no pickle, no remote code.
    """

    name: str
    """The name the model is served under."""
    config: ModelConfig

    @abstractmethod
    def iter_weights(self, keep_quantized: tuple[str, ...] = ()) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (hugging_face_name, tensor) for every weight, dequantized, in the checkpoint's dtype or fp32;
        matrices stored in one of the GGUF types `keep_quantized` may come as a GGUFTensor instead."""

    @abstractmethod
    def load_tokenizer(self):
        """A transformers fast tokenizer with the model's chat template."""
