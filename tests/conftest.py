"""Shared fixtures: the default model's tokenizer saved as a Hugging Face directory, built once."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores are shared by the test process and any servers it starts.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def default_gguf_path() -> str:
    from scalellm.engine.loader import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, default_gguf_path) -> str:
    """The default model's tokenizer (from its GGUF), saved as tokenizer.json + tokenizer_config.json."""
    from transformers import AutoTokenizer

    directory, name = os.path.split(default_gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    out = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def hf_default_model(default_gguf_path):
    """transformers' model and tokenizer on the default model's weights (fp32), the parity reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = os.path.split(default_gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    return model, tokenizer
