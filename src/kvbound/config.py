"""Configuration dataclasses: the model's shape (ModelConfig) read from GGUF/config.json metadata."""

from __future__ import annotations

from dataclasses import dataclass, field

SUPPORTED_ARCHS = ("llama", "qwen2", "mistral")


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "llama" | "qwen2" | "mistral"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    attention_bias: bool = False  # qwen2 (and Llama with attention_bias): q/k/v projections carry a bias
    output_bias: bool = False  # Llama with attention_bias: o_proj carries a bias too (Qwen2's does not)
    mlp_bias: bool = False  # Llama with mlp_bias: gate/up/down carry biases
    rope_scaling: dict | None = field(default=None, hash=False)  # llama3: {"factor", "low_freq_factor", ...}
    sliding_window: int | None = None  # mistral: a query sees only the newest `sliding_window` keys
    name: str = ""

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    @property
    def num_params(self) -> int:
        H, I, L = self.hidden_size, self.intermediate_size, self.num_layers
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        per_layer = H * q + 2 * H * kv + q * H + 3 * H * I + 2 * H + (q + 2 * kv if self.attention_bias else 0)
        embed = self.vocab_size * H * (1 if self.tie_embeddings else 2)
        return L * per_layer + embed + H


@dataclass(frozen=True)
class CacheConfig:
    """How a chat's KV cache is bounded. `budget` (bytes or '64MiB') or `tokens` caps it; neither means the
    model's full context. `dtype` 'auto' stores KV in the compute dtype."""

    budget: int | str | None = None
    tokens: int | None = None
    dtype: str = "auto"  # auto | fp32 | fp16 | bf16 | int8 | int4
    policy: str = "none"  # a name from kvbound.policies (none, window, h2o, snapkv, tova, turns, turns+h2o, ...)
    block_size: int = 32
    sink_tokens: int = 4  # window policy: first tokens always kept (StreamingLLM's attention sinks)
    recent_turns: int = 1  # turns policy: newest whole turns pinned besides the system prompt and current message
    evict_fraction: float = 0.1  # free this share of the capacity per eviction, so compaction stays rare
    policy_options: tuple[tuple[str, int | float], ...] = ()  # other settings of the policy (recent_tokens, ...)

    def __post_init__(self) -> None:
        if self.budget is not None and self.tokens is not None:
            raise ValueError("give either a KV budget in bytes or a number of KV tokens, not both")
        if self.tokens is not None and (not isinstance(self.tokens, int) or self.tokens < 1):
            raise ValueError(f"KV tokens must be a positive integer, got {self.tokens!r}")
        if not 0.0 < self.evict_fraction <= 0.5:
            raise ValueError(f"evict_fraction must be in (0, 0.5], got {self.evict_fraction}")
        if self.sink_tokens < 0 or self.recent_turns < 0:
            raise ValueError("sink_tokens and recent_turns must be >= 0")
