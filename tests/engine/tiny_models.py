"""Randomly initialised tiny models of each supported architecture, made with transformers' own classes."""

from __future__ import annotations

import shutil

import torch

VOCAB_SIZE = 49152  # the default model's tokenizer, so every tiny model can share it

COMMON = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
              bos_token_id=1, eos_token_id=2)

VARIANTS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama3-rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=False, num_key_value_heads=1,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64, "rope_theta": 500000.0})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(tie_word_embeddings=False, sliding_window=None)),
    # a sliding layer (window 8, local rope base) then a full one (linear rope scaling); scores scaled
    # by query_pre_attn_scalar=24 rather than head_dim 16; one KV head
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        tie_word_embeddings=True, num_key_value_heads=1, head_dim=16, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=24, rms_norm_eps=1e-6,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}})),
}

PARALLEL_VARIANTS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        tie_word_embeddings=False, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    "qwen2-moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
        shared_expert_intermediate_size=96, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1])),
    "llama-uneven-heads": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=True, hidden_size=96, num_attention_heads=6, num_key_value_heads=3)),
}
"""Models for the tensor- and expert-parallel tests: MoE layers, and 3 KV heads split 2 + 1 over 2 ranks."""


def make_tiny_model(kind: str, out_dir: str, tokenizer_dir: str, seed: int = 0):
    """Save a random model of `kind` plus the shared tokenizer to out_dir; returns the transformers model."""
    import transformers

    config_name, model_name, extra = {**VARIANTS, **PARALLEL_VARIANTS}[kind]
    config = getattr(transformers, config_name)(**{**COMMON, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # larger weights than the default init give peaked, tie-free distributions
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.08)
            elif kind == "gemma3":  # Gemma's norms scale by 1 + weight (zeros at init): test the offset
                param.normal_(0, 0.2)
    model.save_pretrained(out_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        try:
            shutil.copy(f"{tokenizer_dir}/{name}", out_dir)
        except FileNotFoundError:
            pass
    return model


def hf_greedy(model, prompt_ids: list[int], num_tokens: int) -> list[int]:
    """transformers' greedy continuation, exactly num_tokens long."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=num_tokens, min_new_tokens=num_tokens,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()
