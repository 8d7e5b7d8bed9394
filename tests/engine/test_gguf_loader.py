"""GGUF loading: tensor types, llama.cpp's q/k row order, metadata, and clear errors for broken files."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from scalellm.config import EngineConfig
from scalellm.engine.engine_core import EngineCore
from scalellm.engine.loader import ModelLoadError, open_model_files
from scalellm.engine.loader.gguf import GGUFFiles
from scalellm.engine.request import Request
from scalellm.protocol.types import SamplingParams

HIDDEN, HEADS, KV_HEADS, INTER, VOCAB, LAYERS = 64, 4, 2, 128, 256, 2
Q = gguf.GGMLQuantizationType
TYPES = {"attn_q": Q.F32, "attn_k": Q.F16, "attn_v": Q.BF16, "attn_output": Q.Q8_0,
         "ffn_gate": Q.Q4_0, "ffn_up": Q.Q4_1, "ffn_down": Q.F32}
TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 0.02, Q.Q4_0: 0.2, Q.Q4_1: 0.2}
"""Largest error allowed, relative to the tensor's largest magnitude."""


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter order for q/k rows (pairs instead of halves), written independently."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def random_hf_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS
    weights = {"model.embed_tokens.weight": rng.normal(0, 0.5, (VOCAB, HIDDEN)),
               "model.norm.weight": rng.normal(1, 0.1, (HIDDEN,))}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        weights |= {
            p + "input_layernorm.weight": rng.normal(1, 0.1, (HIDDEN,)),
            p + "post_attention_layernorm.weight": rng.normal(1, 0.1, (HIDDEN,)),
            p + "self_attn.q_proj.weight": rng.normal(0, 0.2, (HEADS * head_dim, HIDDEN)),
            p + "self_attn.k_proj.weight": rng.normal(0, 0.2, (KV_HEADS * head_dim, HIDDEN)),
            p + "self_attn.v_proj.weight": rng.normal(0, 0.2, (KV_HEADS * head_dim, HIDDEN)),
            p + "self_attn.o_proj.weight": rng.normal(0, 0.2, (HIDDEN, HEADS * head_dim)),
            p + "mlp.gate_proj.weight": rng.normal(0, 0.2, (INTER, HIDDEN)),
            p + "mlp.up_proj.weight": rng.normal(0, 0.2, (INTER, HIDDEN)),
            p + "mlp.down_proj.weight": rng.normal(0, 0.2, (HIDDEN, INTER)),
        }
    return {name: w.astype(np.float32) for name, w in weights.items()}


GGUF_LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                    "post_attention_layernorm": "ffn_norm"}


def write_gguf(path: str, weights: dict[str, np.ndarray]) -> None:
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTER)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_token_list([f"t{i}" for i in range(VOCAB)])
    writer.add_eos_token_id(2)
    for name, weight in weights.items():
        if name == "model.embed_tokens.weight":
            writer.add_tensor("token_embd.weight", weight)
            continue
        if name == "model.norm.weight":
            writer.add_tensor("output_norm.weight", weight)
            continue
        layer, rest = name.removeprefix("model.layers.").split(".", 1)
        part = GGUF_LAYER_NAMES[rest.removesuffix(".weight")]
        if part == "attn_q":
            weight = llama_cpp_permute(weight, HEADS)
        elif part == "attn_k":
            weight = llama_cpp_permute(weight, KV_HEADS)
        kind = TYPES.get(part, Q.F32)
        data = weight if kind == Q.F32 else gguf.quants.quantize(weight, kind)
        writer.add_tensor(f"blk.{layer}.{part}.weight", data, raw_dtype=None if kind == Q.F32 else kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    weights = random_hf_weights()
    path = str(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")
    write_gguf(path, weights)
    return path, weights


def test_config_from_metadata(tiny_gguf):
    config = GGUFFiles(tiny_gguf[0]).config
    assert (config.architecture, config.hidden_size, config.num_heads, config.num_kv_heads) == ("llama", 64, 4, 2)
    assert config.head_dim == 16 and config.num_layers == LAYERS and config.vocab_size == VOCAB
    assert config.tie_word_embeddings and config.eos_token_ids == (2,)


def test_every_tensor_type_and_row_order(tiny_gguf):
    path, expected = tiny_gguf
    loaded = dict(GGUFFiles(path).iter_weights())
    assert set(loaded) == set(expected)
    for name, weight in loaded.items():
        part = GGUF_LAYER_NAMES.get(name.removeprefix("model.layers.").split(".", 1)[-1].removesuffix(".weight"))
        tolerance = TOLERANCE[TYPES.get(part, Q.F32)]
        reference = torch.from_numpy(expected[name])
        error = (weight - reference).abs().max() / reference.abs().max()
        assert error <= tolerance + 1e-6, (name, float(error))


def test_engine_on_gguf_matches_hf_weights(tiny_gguf, tmp_path):
    """Greedy tokens from the GGUF equal a transformers model built from the same (dequantized) weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path, _ = tiny_gguf
    files = GGUFFiles(path)
    weights = dict(files.iter_weights())
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rms_norm_eps=1e-5,
                         max_position_embeddings=256, tie_word_embeddings=True)
    hf = LlamaForCausalLM(config).eval()
    hf.load_state_dict(weights, strict=False)
    prompt = [5, 17, 99, 3, 42, 7]
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                          pad_token_id=0)
    core = EngineCore(EngineConfig(model=path, dtype="float32", kv_cache_gib=0.001), files=files)
    request = Request("r", prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), max_tokens=8)
    core.add_requests([request])
    while core.has_work():
        core.step()
    assert request.output_token_ids == out[0, len(prompt):].tolist()


@pytest.mark.parametrize("cut", [10, 200, 2000])
def test_truncated_gguf_is_a_clear_error(tiny_gguf, tmp_path, cut):
    data = open(tiny_gguf[0], "rb").read()
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(data[:cut])
    with pytest.raises(ModelLoadError):
        files = GGUFFiles(str(broken))
        dict(files.iter_weights())


def test_unsupported_and_missing_models_are_clear_errors(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    with pytest.raises(ModelLoadError, match="unsupported architecture"):
        open_model_files(str(tmp_path))
    with pytest.raises(ModelLoadError, match="not found"):
        open_model_files(str(tmp_path / "nowhere"))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read"):
        open_model_files(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "vocab_size": 8, '
                                          '"hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, '
                                          '"num_attention_heads": 2}')
    with pytest.raises(ModelLoadError, match="safetensors"):
        open_model_files(str(tmp_path))


def test_generation_config_adds_eos_ids(tmp_path):
    from scalellm.engine.loader.hf import HFDirectoryFiles

    (tmp_path / "config.json").write_text(
        '{"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, '
        '"num_hidden_layers": 1, "num_attention_heads": 2, "eos_token_id": 2}')
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 5, 7]}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert HFDirectoryFiles(str(tmp_path)).config.eos_token_ids == (2, 5, 7)
