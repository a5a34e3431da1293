"""Model configuration for the Llama family (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM2)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(slots=True)
class ModelConfig:
    arch: str = "llama"
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 0  # 0 -> dim // n_heads
    ffn_dim: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    #  "original_max_position_embeddings": 8192} or {"rope_type": "linear", "factor": f}
    rope_scaling: dict | None = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    name: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.arch!r}; supported: {', '.join(ARCHITECTURES)}"
            )
        if self.head_dim == 0:
            if self.dim % self.n_heads:
                raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def n_rep(self) -> int:
        return self.n_heads // self.n_kv_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def with_(self, **kw) -> "ModelConfig":
        return replace(self, **kw)


# Named presets. `tiny` is the seeded unit-test model; the rest document real shapes.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(arch="llama", vocab_size=256, dim=64, n_layers=4, n_heads=4, n_kv_heads=2,
                        ffn_dim=128, max_seq_len=512, tie_embeddings=True, rope_theta=10000.0,
                        name="tiny"),
    "tiny-qwen2": ModelConfig(arch="qwen2", vocab_size=256, dim=64, n_layers=4, n_heads=4,
                              n_kv_heads=2, ffn_dim=128, max_seq_len=512, qkv_bias=True,
                              name="tiny-qwen2"),
    "tiny-qwen3": ModelConfig(arch="qwen3", vocab_size=256, dim=64, n_layers=4, n_heads=4,
                              n_kv_heads=2, head_dim=32, ffn_dim=128, max_seq_len=512,
                              qk_norm=True, name="tiny-qwen3"),
    "tiny-llama3": ModelConfig(arch="llama", vocab_size=256, dim=64, n_layers=4, n_heads=4,
                               n_kv_heads=1, ffn_dim=128, max_seq_len=512, rope_theta=500000.0,
                               rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 64},
                               name="tiny-llama3"),
    "smollm2-135m": ModelConfig(arch="llama", vocab_size=49152, dim=576, n_layers=30, n_heads=9,
                                n_kv_heads=3, ffn_dim=1536, norm_eps=1e-5, rope_theta=100000.0,
                                max_seq_len=8192, tie_embeddings=True, name="smollm2-135m"),
}
