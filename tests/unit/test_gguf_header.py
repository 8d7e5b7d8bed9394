"""The GGUF header reader (engine/loader/gguf_header.py) against the `gguf` package's own reader."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from scalellm.engine.loader import ModelLoadError, default_model_path
from scalellm.engine.loader.gguf_header import read_gguf_header


def test_reads_what_the_gguf_package_reads():
    path = default_model_path()
    header, reference = read_gguf_header(path), gguf.GGUFReader(path)
    expected = {key: field.contents() for key, field in reference.fields.items() if not key.startswith("GGUF.")}
    assert header.fields == expected
    assert len(header.fields["tokenizer.ggml.tokens"]) == 49152
    assert [t.name for t in header.tensors] == [t.name for t in reference.tensors]
    for ours, theirs in zip(header.tensors, reference.tensors):
        assert (ours.tensor_type, ours.shape, ours.n_elements, ours.n_bytes) == (
            theirs.tensor_type, tuple(int(d) for d in theirs.shape), int(theirs.n_elements), int(theirs.n_bytes))
        assert ours.data.dtype == theirs.data.dtype and ours.data.shape == theirs.data.shape
        assert np.array_equal(ours.data, theirs.data)


def write(path, fields: dict, tensor_type=gguf.GGMLQuantizationType.F32) -> str:
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in fields.items():
        writer.add_key_value(key, value, gguf.GGUFValueType.get_type(value))
    writer.add_tensor("token_embd.weight", np.arange(64, dtype=np.float32).reshape(2, 32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_values_of_every_kind(tmp_path):
    fields = {"a.int": 7, "a.float": 0.5, "a.flag": True, "a.text": "héllo", "a.ints": [1, 2, 3],
              "a.words": ["x", "yz", ""], "a.nested": [[1, 2], [3]]}
    header = read_gguf_header(write(tmp_path / "m.gguf", fields))
    for key, value in fields.items():
        assert header.fields[key] == value, key
    (tensor,) = header.tensors
    assert tensor.shape == (32, 2) and np.array_equal(tensor.data, np.arange(64).reshape(2, 32))


@pytest.mark.parametrize("edit, message", [
    (lambda data: b"GGUX" + data[4:], "not a GGUF file"),
    (lambda data: data[:4] + (9).to_bytes(4, "little") + data[8:], "version 9"),
    (lambda data: data[:200], "claims|truncated"),
    (lambda data: data[:-8], "truncated or corrupt"),
])
def test_broken_headers_are_model_load_errors(tmp_path, edit, message):
    path = write(tmp_path / "m.gguf", {"a.int": 7})
    data = open(path, "rb").read()
    open(path, "wb").write(edit(data))
    with pytest.raises(ModelLoadError, match=message):
        read_gguf_header(path)
