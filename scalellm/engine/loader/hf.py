"""Hugging Face model directories: config.json, safetensors (one file or sharded), tokenizer files."""

from __future__ import annotations

import json
import os
from typing import Iterator

import torch

from scalellm.engine.loader.base import ModelFiles
from scalellm.engine.loader.model_config import ModelConfig, ModelLoadError


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
        self.config = ModelConfig.from_hf_dict(raw, _read_generation_config(path))
        self.weight_files = self._find_weight_files()

    def _find_weight_files(self) -> list[str]:
        index = os.path.join(self.path, "model.safetensors.index.json")
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    names = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError) as exc:
                raise ModelLoadError(f"cannot read {index}: {exc}") from None
            files = [os.path.join(self.path, n) for n in names]
        else:
            files = sorted(os.path.join(self.path, n) for n in os.listdir(self.path) if n.endswith(".safetensors"))
        if not files:
            raise ModelLoadError(f"{self.path} has no .safetensors weights (pickled .bin weights are not loaded)")
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ModelLoadError(f"missing weight shard {missing[0]}")
        return files

    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
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
