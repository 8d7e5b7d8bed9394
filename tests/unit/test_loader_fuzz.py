"""Hostile model files: mutated GGUF and safetensors files, pickled checkpoints and remote code.

Every mutation of a small valid file must either load or fail with ModelLoadError: never another
exception, never a hang, never an allocation out of proportion to the file (numpy allocations are
traced by tracemalloc; the process's peak RSS bounds the rest).
"""

from __future__ import annotations

import json
import pickle
import resource
import struct
import time
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from scalellm.engine.loader import ModelLoadError, open_model_files
from scalellm.engine.loader.gguf import GGUFFiles
from scalellm.engine.loader.hf import HFDirectoryFiles

HIDDEN, INTER, VOCAB = 8, 16, 32
MAX_TRACED_BYTES = 16 * 2**20
"""The files are about 5 KB: a few MiB covers the reader's own structures, not a claimed size."""
MAX_SECONDS = 5.0
LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB, "hidden_size": HIDDEN,
                "intermediate_size": INTER, "num_hidden_layers": 1, "num_attention_heads": 2}
FUZZ = settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])


def write_tiny_gguf(path: Path) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTER)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_token_list([f"t{i}" for i in range(VOCAB)])
    writer.add_eos_token_id(2)
    rng = np.random.default_rng(0)
    writer.add_tensor("token_embd.weight", rng.normal(size=(VOCAB, HIDDEN)).astype(np.float32))
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    for part, shape in (("attn_q", (HIDDEN, HIDDEN)), ("attn_k", (HIDDEN, HIDDEN)), ("ffn_up", (INTER, HIDDEN))):
        writer.add_tensor(f"blk.0.{part}.weight", rng.normal(size=shape).astype(np.float32))
    q8 = gguf.quants.quantize(rng.normal(size=(HIDDEN, 32)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_v.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, bytes]:
    directory = tmp_path_factory.mktemp("originals")
    write_tiny_gguf(directory / "tiny.gguf")
    save_file({"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN), "model.norm.weight": torch.ones(HIDDEN),
               "model.layers.0.mlp.up_proj.weight": torch.randn(INTER, HIDDEN).half()},
              str(directory / "model.safetensors"))
    return {"gguf": (directory / "tiny.gguf").read_bytes(),
            "safetensors": (directory / "model.safetensors").read_bytes()}


HUGE = st.sampled_from([2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1)
MUTATION = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("overwrite"), st.floats(0, 1), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("u64"), st.floats(0, 1), HUGE),
    st.tuples(st.just("u32"), st.floats(0, 1), st.integers(0, 2**32 - 1)),
)


def mutate(data: bytes, mutations: list[tuple]) -> bytes:
    """Apply the mutations; positions are fractions of the length, biased to the header by squaring."""
    for kind, where, *value in mutations:
        if not data:
            break
        at = min(len(data) - 1, int(where * where * len(data)))
        if kind == "truncate":
            data = data[:at]
        elif kind == "overwrite":
            data = data[:at] + value[0] + data[at + len(value[0]):]
        else:
            packed = struct.pack("<Q" if kind == "u64" else "<I", value[0])
            data = data[:at] + packed + data[at + len(packed):]
    return data


def load_bounded(load) -> str:
    """Run `load()`; 'ok' or 'refused' (ModelLoadError); fails on anything else, on time or memory."""
    tracemalloc.start()
    start = time.monotonic()
    try:
        load()
        outcome = "ok"
    except ModelLoadError as error:
        assert str(error), "a load error must say what is wrong"
        outcome = "refused"
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert time.monotonic() - start < MAX_SECONDS
    assert peak < MAX_TRACED_BYTES, f"allocated {peak} bytes for a small file"
    return outcome


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_valid_files_load(originals, tmp_path):
    path = tmp_path / "tiny.gguf"
    path.write_bytes(originals["gguf"])
    assert load_bounded(lambda: dict(GGUFFiles(str(path)).iter_weights())) == "ok"
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    (tmp_path / "model.safetensors").write_bytes(originals["safetensors"])
    assert load_bounded(lambda: dict(HFDirectoryFiles(str(tmp_path)).iter_weights())) == "ok"


@FUZZ
@given(mutations=st.lists(MUTATION, min_size=1, max_size=3))
def test_mutated_gguf_loads_or_is_refused(originals, tmp_path, mutations):
    rss_before = _max_rss_mib()
    path = tmp_path / "fuzzed.gguf"
    path.write_bytes(mutate(originals["gguf"], mutations))
    load_bounded(lambda: dict(GGUFFiles(str(path)).iter_weights()))
    assert _max_rss_mib() - rss_before < 256


@FUZZ
@given(mutations=st.lists(MUTATION, min_size=1, max_size=3))
def test_mutated_safetensors_loads_or_is_refused(originals, tmp_path, mutations):
    rss_before = _max_rss_mib()
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    (tmp_path / "model.safetensors").write_bytes(mutate(originals["safetensors"], mutations))
    load_bounded(lambda: dict(HFDirectoryFiles(str(tmp_path)).iter_weights()))
    assert _max_rss_mib() - rss_before < 256


@pytest.mark.parametrize("claim", [2**40, 2**63, 2**64 - 1])
def test_huge_claims_in_headers_are_refused_without_allocating(originals, tmp_path, claim):
    """The GGUF tensor and KV counts, an array's length, and the safetensors header length, claimed far
    beyond the file."""
    data = originals["gguf"]
    for offset in (8, 16):  # tensor count, metadata count
        path = tmp_path / f"claim{offset}.gguf"
        path.write_bytes(data[:offset] + struct.pack("<Q", claim) + data[offset + 8:])
        assert load_bounded(lambda: GGUFFiles(str(path))) == "refused"
    key = b"tokenizer.ggml.tokens"  # then: value type u32 (array), item type u32, item count u64
    at = data.index(key) + len(key) + 8
    for item_type in (0, 8, 9):  # an array of uint8, of strings, of arrays
        path = tmp_path / f"array{item_type}.gguf"
        path.write_bytes(data[:at - 4] + struct.pack("<IQ", item_type, claim) + data[at + 8:])
        assert load_bounded(lambda: GGUFFiles(str(path))) == "refused"
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", claim) + originals["safetensors"][8:])
    assert load_bounded(lambda: dict(HFDirectoryFiles(str(tmp_path)).iter_weights())) == "refused"


CONFIG_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=5),
                         st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                              max_size=2))


@FUZZ
@given(overrides=st.dictionaries(st.sampled_from(sorted({*LLAMA_CONFIG, "num_key_value_heads", "head_dim",
                                                           "rope_scaling", "eos_token_id", "rope_theta",
                                                           "max_position_embeddings"})),
                                 CONFIG_VALUE, min_size=1, max_size=4))
def test_fuzzed_config_json_loads_or_is_refused(originals, tmp_path, overrides):
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA_CONFIG, **overrides}, default=str))
    (tmp_path / "model.safetensors").write_bytes(originals["safetensors"])
    load_bounded(lambda: HFDirectoryFiles(str(tmp_path)))


class _Payload:
    """Unpickling this writes a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_pickled_checkpoints_are_never_loaded(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"model.norm.weight": _Payload(marker)})
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    (directory / "pytorch_model.bin").write_bytes(payload)
    with pytest.raises(ModelLoadError, match="pickled weights pytorch_model.bin.*never loaded.*safetensors"):
        open_model_files(str(directory))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "pytorch_model.bin"}}))
    with pytest.raises(ModelLoadError, match="must be .safetensors files"):
        open_model_files(str(directory))
    for name in ("model.pt", "model.bin", "model.pth", "model.ckpt"):
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(ModelLoadError, match="expected a .gguf file or a Hugging Face model directory"):
            open_model_files(str(tmp_path / name))
    assert not marker.exists()


def test_index_cannot_point_outside_the_model_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "../elsewhere/model.safetensors"}}))
    with pytest.raises(ModelLoadError, match="inside"):
        open_model_files(str(tmp_path))


def test_tokenizer_remote_code_is_never_run(tmp_path, tokenizer_dir):
    """A tokenizer_config.json whose auto_map names a Python class in the directory: refused, not run."""
    marker = tmp_path / "pwned"
    for name in ("tokenizer.json",):
        (tmp_path / name).write_bytes((Path(tokenizer_dir) / name).read_bytes())
    (tmp_path / "evil_tokenizer.py").write_text(f"open({str(marker)!r}, 'w').write('code ran')\n"
                                                "from transformers import PreTrainedTokenizerFast\n"
                                                "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": [None, "evil_tokenizer.EvilTokenizer"]}}))
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA_CONFIG, "auto_map": {
        "AutoModelForCausalLM": "evil_tokenizer.EvilTokenizer"}}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    files = HFDirectoryFiles(str(tmp_path))
    try:
        files.load_tokenizer()
    except ModelLoadError:
        pass
    assert not marker.exists()
