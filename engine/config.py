"""Engine configuration: small frozen dataclasses composed into one root.

Every class validates itself on construction and raises ``ValueError`` naming the
field and the value, so a bad setting fails at start-up rather than mid-request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {message}")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3's "llama3" frequency scaling of rotary embeddings."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def __post_init__(self) -> None:
        _require(self.factor > 0, "rope_scaling.factor", f"must be > 0, got {self.factor}")
        _require(
            self.high_freq_factor > self.low_freq_factor,
            "rope_scaling.high_freq_factor",
            f"must exceed low_freq_factor, got {self.high_freq_factor} <= {self.low_freq_factor}",
        )


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder; loaders fill it from config.json or GGUF."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        _require(
            self.architecture in SUPPORTED_ARCHITECTURES,
            "architecture",
            f"unsupported architecture {self.architecture!r} "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})",
        )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and value > 0, name, f"must be a positive int, got {value!r}"
            )
        _require(
            self.num_heads % self.num_kv_heads == 0,
            "num_kv_heads",
            f"must divide num_heads={self.num_heads}, got {self.num_kv_heads}",
        )
        _require(
            self.hidden_act == "silu",
            "hidden_act",
            f"only 'silu' is supported, got {self.hidden_act!r}",
        )


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache: a fixed number of blocks, or a fraction of memory to fill."""

    block_size: int = 16
    num_blocks: int | None = None
    memory_fraction: float | None = None
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _require(self.block_size > 0, "block_size", f"must be > 0, got {self.block_size}")
        if self.num_blocks is not None:
            _require(self.num_blocks > 0, "num_kv_blocks", f"must be > 0, got {self.num_blocks}")
        if self.memory_fraction is not None:
            _require(
                0 < self.memory_fraction <= 1,
                "kv_cache_memory_fraction",
                f"must be in (0, 1], got {self.memory_fraction}",
            )
        _require(
            self.num_blocks is None or self.memory_fraction is None,
            "num_kv_blocks",
            "give num_kv_blocks or kv_cache_memory_fraction, not both",
        )


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits: sequences per step and tokens per step."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        _require(self.max_num_seqs > 0, "max_num_seqs", f"must be > 0, got {self.max_num_seqs}")
        _require(
            self.max_num_batched_tokens > 0,
            "max_num_batched_tokens",
            f"must be > 0, got {self.max_num_batched_tokens}",
        )


@dataclass(frozen=True)
class ParallelConfig:
    """An instance's layout: ``pp`` pipeline stages of ``tp`` tensor-parallel ranks each.

    Ranks are numbered stage-major (``rank = stage * tp + tp_rank``) so that a stage's TP
    ranks, which all-reduce twice per layer, are neighbours (one node, one NVLink island).
    What fits a particular model is checked by :meth:`check_model` once its shape is known.
    """

    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "pp"):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and not isinstance(value, bool) and value > 0,
                name,
                f"must be a positive int, got {value!r}",
            )

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def check_model(self, model: ModelConfig) -> None:
        """Raise ValueError naming ``tp`` or ``pp`` if this layout cannot split ``model``."""
        tp, kv = self.tp, model.num_kv_heads
        _require(
            model.num_heads % tp == 0,
            "tp",
            f"must divide the model's num_heads={model.num_heads}, got {tp}",
        )
        # Below the KV head count each rank holds kv/tp of them; above it, each holds one
        # (replicated): either way a rank's query heads must share its KV heads.
        _require(
            kv % tp == 0 or tp % kv == 0,
            "tp",
            f"must divide the model's num_kv_heads={kv} or be a multiple of it, got {tp}",
        )
        _require(
            model.intermediate_size % tp == 0,
            "tp",
            f"must divide the model's intermediate_size={model.intermediate_size}, got {tp}",
        )
        _require(
            self.pp <= model.num_layers,
            "pp",
            f"must not exceed the model's num_layers={model.num_layers}, got {self.pp}",
        )


@dataclass(frozen=True)
class EngineConfig:
    """The root: what to load and how to run it."""

    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    attention_backend: str = "auto"
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    seed: int = 0
    # tp x pp > 1 runs on ranks started by engine.parallel.worker, never by from_config.
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        _require(
            self.dtype in ("auto", "float32", "float16", "bfloat16"),
            "dtype",
            f"must be one of auto, float32, float16, bfloat16, got {self.dtype!r}",
        )
        _require(
            self.device in ("auto", "cpu", "cuda"),
            "device",
            f"must be auto, cpu or cuda, got {self.device!r}",
        )
        _require(
            self.attention_backend in ("auto", "torch", "sdpa", "flash"),
            "attention_backend",
            f"must be auto, torch, sdpa or flash, got {self.attention_backend!r}",
        )
