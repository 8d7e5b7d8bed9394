"""GGUF files the engine cannot serve are refused at load with a ModelLoadError that names the problem."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from scalellm.engine.loader import ModelLoadError
from scalellm.engine.loader.gguf import GGUFFiles

Q = gguf.GGMLQuantizationType


def write(path, arch: str = "llama", tokens: bool = True, tokenizer_model: str | None = None,
          tensor_type: Q = Q.F32, truncate_by: int = 0) -> str:
    """A one-layer-header GGUF with a single 32 x 32 tensor; `truncate_by` bytes cut from its end."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (("block_count", 1), ("embedding_length", 32), ("feed_forward_length", 64),
                       ("attention.head_count", 2), ("context_length", 128)):
        writer.add_uint32(f"{arch}.{key}", value)
    if tokens:
        writer.add_token_list([f"t{i}" for i in range(32)])
    if tokenizer_model:
        writer.add_tokenizer_model(tokenizer_model)
    if tensor_type == Q.F32:
        writer.add_tensor("token_embd.weight", np.zeros((32, 32), dtype=np.float32))
    else:  # raw blocks: 32 rows of one block each
        _, type_size = gguf.GGML_QUANT_SIZES[tensor_type]
        writer.add_tensor("token_embd.weight", np.zeros((32, type_size), dtype=np.uint8), raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if truncate_by:
        data = open(path, "rb").read()
        open(path, "wb").write(data[:-truncate_by])
    return str(path)


def test_unsupported_architecture_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="unsupported GGUF architecture 'gpt2'"):
        GGUFFiles(write(tmp_path / "m.gguf", arch="gpt2"))


def test_unsupported_tensor_type_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="token_embd.weight has unsupported GGUF type IQ4_NL"):
        GGUFFiles(write(tmp_path / "m.gguf", tensor_type=Q.IQ4_NL))


def test_truncated_tensor_data_is_named(tmp_path):
    """The header claims 32 x 32 fp32 values; the file holds 100 bytes fewer."""
    with pytest.raises(ModelLoadError, match="truncated or corrupt|not a readable GGUF"):
        files = GGUFFiles(write(tmp_path / "m.gguf", truncate_by=100))
        dict(files.iter_weights())


def test_missing_tokenizer_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match=r"no tokenizer \(tokenizer.ggml.tokens\)"):
        GGUFFiles(write(tmp_path / "m.gguf", tokens=False))


def test_tokenizer_the_file_does_not_describe_is_refused(tmp_path):
    files = GGUFFiles(write(tmp_path / "m.gguf", tokenizer_model="made-up-model"))
    with pytest.raises(ModelLoadError, match="cannot build a tokenizer"):
        files.load_tokenizer()
