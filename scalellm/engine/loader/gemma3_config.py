"""Gemma 3's ModelConfig, from a Hugging Face config.json (Gemma3ForCausalLM) or GGUF metadata.

Gemma 3 interleaves sliding-window (local) layers and full (global) layers, five local to one
global in the released models, each kind with its own rope base:

    layer    0  1  2  3  4  5  6  7 ...
    kind     L  L  L  L  L  G  L  L ...      L: window of sliding_window keys, rope base 10k
                                              G: whole context, rope base rope_theta (+ scaling)

GGUF files do not store the pattern; llama.cpp uses the same fixed one (every 6th layer global).
"""

from __future__ import annotations

from scalellm.engine.loader.model_config import FULL, SLIDING, ModelConfig, ModelLoadError, _as_tuple

SLIDING_WINDOW_PATTERN = 6
"""Layer i is global when (i + 1) % 6 == 0."""
LOCAL_ROPE_THETA = 10000.0


def default_layer_types(num_layers: int, pattern: int = SLIDING_WINDOW_PATTERN) -> tuple[str, ...]:
    return tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(num_layers))


def gemma3_config(config: dict, generation_config: dict | None = None) -> ModelConfig:
    """ModelConfig from a Gemma3ForCausalLM config.json dictionary (transformers 4.5x or 5.x keys)."""
    if config.get("attn_logit_softcapping") is not None:
        raise ModelLoadError("attention logit softcapping (attn_logit_softcapping) is not supported")
    activation = config.get("hidden_activation", "gelu_pytorch_tanh")
    if activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ModelLoadError(f"Gemma 3 with hidden_activation {activation!r} is not supported (gelu_pytorch_tanh is)")
    try:
        num_layers = config["num_hidden_layers"]
        num_heads = config["num_attention_heads"]
        full_rope, local_theta = _rope(config)
        layer_types = tuple(config.get("layer_types") or default_layer_types(
            num_layers, config.get("sliding_window_pattern") or SLIDING_WINDOW_PATTERN))
        eos = _as_tuple(config.get("eos_token_id")) + _as_tuple((generation_config or {}).get("eos_token_id"))
        return ModelConfig(
            architecture="gemma3",
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=config.get("head_dim") or 256,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(full_rope.pop("rope_theta", 1_000_000.0)),
            max_position_embeddings=config.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
            attention_bias=bool(config.get("attention_bias", False)),
            rope_scaling=full_rope,
            sliding_window=config.get("sliding_window") or 4096,
            layer_types=layer_types,
            local_rope_theta=local_theta,
            query_pre_attn_scalar=float(config.get("query_pre_attn_scalar") or config.get("head_dim") or 256),
            final_logit_softcapping=config.get("final_logit_softcapping"),
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=tuple(dict.fromkeys(eos)),
        )
    except KeyError as exc:
        raise ModelLoadError(f"config.json is missing {exc.args[0]!r}") from None


def _rope(config: dict) -> tuple[dict, float]:
    """(the full layers' rope parameters with rope_theta, the sliding layers' base)."""
    params = config.get("rope_parameters") or {}
    if FULL in params:  # transformers 5: one entry per layer kind
        full = dict(params[FULL])
        local_theta = float(params.get(SLIDING, {}).get("rope_theta", LOCAL_ROPE_THETA))
    else:  # transformers 4: rope_theta, rope_local_base_freq and rope_scaling at the top level
        full = dict(config.get("rope_scaling") or {})
        full["rope_theta"] = config.get("rope_theta", 1_000_000.0)
        local_theta = float(config.get("rope_local_base_freq", LOCAL_ROPE_THETA))
    if "type" in full and "rope_type" not in full:
        full["rope_type"] = full.pop("type")
    full.setdefault("rope_type", "default")
    return full, local_theta
