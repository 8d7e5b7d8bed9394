"""The architecture-level description of a model, read from config.json or GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass, field

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Gemma3ForCausalLM": "gemma3",
}

SLIDING, FULL = "sliding_attention", "full_attention"
"""ModelConfig.layer_types values (Hugging Face's names)."""


class ModelLoadError(ValueError):
    """A model that cannot be loaded: unsupported architecture, missing or broken files."""


@dataclass(frozen=True)
class MoEConfig:
    """The sparse mixture-of-experts blocks of Mixtral and Qwen2-MoE."""

    num_experts: int
    num_experts_per_token: int
    """The router's top-k."""
    intermediate_size: int
    """Of each expert."""
    renormalize: bool = True
    """Divide the top-k routing weights by their sum (Mixtral always; Qwen2-MoE's norm_topk_prob)."""
    shared_intermediate_size: int = 0
    """Qwen2-MoE's shared expert, gated per token; 0: none."""
    dense_layers: tuple[int, ...] = ()
    """Layers with a dense MLP (of ModelConfig.intermediate_size) instead of experts."""

    def __post_init__(self) -> None:
        if not 1 <= self.num_experts_per_token <= self.num_experts:
            raise ModelLoadError(f"num_experts_per_tok ({self.num_experts_per_token}) must be between 1 and "
                                 f"the number of experts ({self.num_experts})")


@dataclass(frozen=True)
class ModelConfig:
    """The knobs of the Llama family that the model file reads."""

    architecture: str
    """One of SUPPORTED_ARCHITECTURES' values: llama, mistral, qwen2, mixtral, qwen2_moe, gemma3."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    """Biases on the q, k and v projections (Qwen2)."""
    rope_scaling: dict = field(default_factory=dict)
    """{"rope_type": "default" | "linear" | "llama3", ...the type's parameters}."""
    sliding_window: int | None = None
    """Keys a query sees on sliding layers, counting itself; None attends to the whole context."""
    layer_types: tuple[str, ...] = ()
    """Per layer SLIDING or FULL (Gemma 3 interleaves them); empty: every layer slides when
    sliding_window is set (Mistral)."""
    local_rope_theta: float | None = None
    """The rope base of sliding layers when it differs from rope_theta (Gemma 3: 10k); rope_scaling
    applies to the full layers only."""
    query_pre_attn_scalar: float | None = None
    """Attention scores are scaled by query_pre_attn_scalar ** -0.5; None: head_dim ** -0.5."""
    final_logit_softcapping: float | None = None
    """logits = cap * tanh(logits / cap) when set."""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    moe: MoEConfig | None = None
    """The experts of a mixture-of-experts model; None for dense models."""

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads ({self.num_kv_heads})")
        rope_type = self.rope_scaling.get("rope_type", "default")
        if rope_type not in ("default", "linear", "llama3"):
            raise ModelLoadError(f"rope scaling type {rope_type!r} is not supported (default, linear, llama3 are)")
        if self.layer_types and (len(self.layer_types) != self.num_layers or set(self.layer_types) - {SLIDING, FULL}):
            raise ModelLoadError(f"layer_types must name {SLIDING!r} or {FULL!r} for each of the "
                                 f"{self.num_layers} layers, got {self.layer_types!r}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ModelLoadError(f"sliding_window must be a positive integer, got {self.sliding_window!r}")

    def is_sliding(self, layer_index: int) -> bool:
        """Whether layer `layer_index` attends within sliding_window only."""
        if self.sliding_window is None:
            return False
        return not self.layer_types or self.layer_types[layer_index] == SLIDING

    @property
    def has_mixed_attention(self) -> bool:
        """Some layers slide and some attend to the whole context (Gemma 3)."""
        kinds = {self.is_sliding(i) for i in range(self.num_layers)}
        return len(kinds) == 2

    @classmethod
    def from_hf_dict(cls, config: dict, generation_config: dict | None = None) -> "ModelConfig":
        """Build from a Hugging Face config.json dictionary (and generation_config.json's EOS ids)."""
        architectures = config.get("architectures") or []
        known = [a for a in architectures if a in SUPPORTED_ARCHITECTURES]
        if not known:
            raise ModelLoadError(
                f"unsupported architecture {architectures or config.get('model_type')!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        arch = SUPPORTED_ARCHITECTURES[known[0]]
        if arch == "gemma3":
            from scalellm.engine.loader.gemma3_config import gemma3_config

            return gemma3_config(config, generation_config)
        try:
            num_heads = config["num_attention_heads"]
            hidden_size = config["hidden_size"]
            return cls(
                architecture=arch,
                vocab_size=config["vocab_size"],
                hidden_size=hidden_size,
                intermediate_size=config["intermediate_size"],
                num_layers=config["num_hidden_layers"],
                num_heads=num_heads,
                num_kv_heads=config.get("num_key_value_heads") or num_heads,
                head_dim=config.get("head_dim") or hidden_size // num_heads,
                rms_norm_eps=config.get("rms_norm_eps", 1e-6),
                rope_theta=_rope_theta(config),
                max_position_embeddings=config.get("max_position_embeddings", 2048),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                attention_bias=_attention_bias(arch, config),
                rope_scaling=_rope_scaling(config),
                sliding_window=config.get("sliding_window") if config.get(
                    "use_sliding_window", arch in ("mistral", "mixtral")) else None,
                bos_token_id=config.get("bos_token_id"),
                eos_token_ids=tuple(dict.fromkeys(_as_tuple(config.get("eos_token_id"))
                                                  + _as_tuple((generation_config or {}).get("eos_token_id")))),
                moe=_moe_config(arch, config),
            )
        except KeyError as exc:
            raise ModelLoadError(f"config.json is missing {exc.args[0]!r}") from None


def _attention_bias(arch: str, config: dict) -> bool:
    if arch == "qwen2":
        return True
    if arch == "qwen2_moe":
        return bool(config.get("qkv_bias", True))
    return bool(config.get("attention_bias", False))


def _moe_config(arch: str, config: dict) -> MoEConfig | None:
    if arch == "mixtral":
        return MoEConfig(num_experts=config["num_local_experts"], num_experts_per_token=config["num_experts_per_tok"],
                         intermediate_size=config["intermediate_size"])
    if arch != "qwen2_moe" or not config["num_experts"]:
        return None
    num_experts, step = config["num_experts"], config.get("decoder_sparse_step", 1)
    only_dense = set(config.get("mlp_only_layers") or ())
    dense = tuple(i for i in range(config["num_hidden_layers"])
                  if i in only_dense or (i + 1) % step)
    return MoEConfig(num_experts=num_experts, num_experts_per_token=config["num_experts_per_tok"],
                     intermediate_size=config["moe_intermediate_size"],
                     renormalize=bool(config.get("norm_topk_prob", False)),
                     shared_intermediate_size=config.get("shared_expert_intermediate_size", 0),
                     dense_layers=dense)


def _rope_theta(config: dict) -> float:
    params = config.get("rope_parameters") or {}
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def _rope_scaling(config: dict) -> dict:
    scaling = dict(config.get("rope_scaling") or config.get("rope_parameters") or {})
    scaling.pop("rope_theta", None)
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    scaling.setdefault("rope_type", "default")
    return scaling


def _as_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(value)
