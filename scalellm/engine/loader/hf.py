"""Hugging Face model directories: config.json, safetensors (one file or sharded), tokenizer files.

Nothing in the directory is ever executed: weights come only from safetensors (a pickled .bin/.pt
checkpoint is refused with a message saying why), the tokenizer is loaded with trust_remote_code=False
(an auto_map pointing at Python files is an error), and shard names from the index must name files
inside the directory. The safetensors library checks every header against the file's size before
anything is read, so a broken file is a `ModelLoadError`, not a crash or a huge allocation.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import torch

from scalellm.engine.loader.base import ModelFiles
from scalellm.engine.loader.model_config import ModelConfig, ModelLoadError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "max_position_embeddings")


class HFDirectoryFiles(ModelFiles):
    """A directory as written by transformers' save_pretrained (safetensors weights only)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.name = os.path.basename(os.path.normpath(path))
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise ModelLoadError(f"{path} has no config.json: not a Hugging Face model directory")
        try:
            with open(config_path, encoding="utf-8") as f:
                raw = json.load(f)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read {config_path}: {exc}") from None
        self.config = _model_config(raw, _read_generation_config(path))
        self.weight_files = self._find_weight_files()

    def _find_weight_files(self) -> list[str]:
        index = os.path.join(self.path, "model.safetensors.index.json")
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    names = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError) as exc:
                raise ModelLoadError(f"cannot read {index}: {exc}") from None
            bad = [n for n in names if not isinstance(n, str) or not n.endswith(".safetensors")
                   or os.path.basename(n) != n or n.startswith(".")]
            if bad:
                raise ModelLoadError(f"{index} lists {bad[0]!r}: shards must be .safetensors files inside "
                                     f"{self.path} (pickled weights are never loaded)")
            files = [os.path.join(self.path, n) for n in names]
        else:
            files = sorted(os.path.join(self.path, n) for n in os.listdir(self.path) if n.endswith(".safetensors"))
        if not files:
            pickled = sorted(n for n in os.listdir(self.path) if n.endswith(PICKLE_SUFFIXES))
            found = f" (found pickled weights {', '.join(pickled)}: pickle can run code when loaded, so they are " \
                    "never loaded; convert them to safetensors)" if pickled else ""
            raise ModelLoadError(f"{self.path} has no .safetensors weights{found}")
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ModelLoadError(f"missing weight shard {missing[0]}")
        return files

    def iter_weights(self, keep_quantized: tuple[str, ...] = ()) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import SafetensorError, safe_open

        for file in self.weight_files:
            try:
                with safe_open(file, framework="pt") as f:
                    for key in f.keys():
                        yield key, f.get_tensor(key)
            except (SafetensorError, OSError) as exc:
                raise ModelLoadError(f"broken safetensors file {file}: {exc}") from None

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.path, trust_remote_code=False)
        except Exception as exc:  # transformers raises many types for missing/broken tokenizer files
            raise ModelLoadError(f"cannot load the tokenizer from {self.path}: {exc}") from None


def _model_config(raw, generation_config: dict) -> ModelConfig:
    """ModelConfig from config.json's dictionary, with sizes checked before any arithmetic on them."""
    if not isinstance(raw, dict):
        raise ModelLoadError("config.json must hold a JSON object")
    for name in SIZE_FIELDS:
        value = raw.get(name)
        if value is not None and (type(value) is not int or value <= 0):
            raise ModelLoadError(f"config.json: {name!r} must be a positive integer, got {value!r}")
    try:
        return ModelConfig.from_hf_dict(raw, generation_config if isinstance(generation_config, dict) else {})
    except ModelLoadError:
        raise
    except (TypeError, ValueError, ArithmeticError, AttributeError) as exc:
        raise ModelLoadError(f"config.json has an invalid value: {exc}") from None


def _read_generation_config(path: str) -> dict:
    """generation_config.json when present (it may list several EOS ids); {} otherwise."""
    file = os.path.join(path, "generation_config.json")
    if not os.path.isfile(file):
        return {}
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {file}: {exc}") from None
