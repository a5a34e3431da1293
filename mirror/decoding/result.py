"""What a generation returns: ids, text, finish reason and per-request metrics."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(slots=True)
class Metrics:
    """Per-request counters. Speculative methods fill the draft/acceptance fields."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    target_steps: int = 0  # target forward passes after prefill
    drafted_tokens: int = 0  # draft tokens proposed to the target for verification
    accepted_tokens: int = 0  # of those, accepted
    # Mirror-SD verify_cut: steps whose suffix ran fewer rows than the window, the draft tokens it
    # left unverified, and the cuts that were wrong (the target's token there was the draft's)
    cut_steps: int = 0
    cut_tokens: int = 0
    cut_wrong: int = 0
    draft_tokens_computed: int = 0  # every token the draft produced, used or not
    draft_tokens_used: int = 0  # tokens of windows that reached verification
    hits: int = 0  # Mirror-SD: verdict found among the precomputed branches
    misses: int = 0
    omega_hits: int = 0  # target's token inside the early-exit top-kappa set at the rejection position
    omega_total: int = 0
    omega_mass: float = 0.0  # summed target probability mass inside the early-exit top-kappa set
    prefill_s: float = 0.0
    decode_s: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def tau(self) -> float:
        """Mean committed tokens per target step."""
        return self.committed / self.target_steps if self.target_steps else 0.0

    @property
    def committed(self) -> int:
        return self.accepted_tokens + self.target_steps

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0

    @property
    def miss_rate(self) -> float:
        n = self.hits + self.misses
        return self.misses / n if n else 0.0

    @property
    def omega(self) -> float:
        """Omega_kappa: mean target probability mass inside the early-exit top-kappa set."""
        return self.omega_mass / self.omega_total if self.omega_total else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(tau=self.tau, acceptance_rate=self.acceptance_rate, hit_rate=self.hit_rate,
                 miss_rate=self.miss_rate, omega=self.omega, tokens_per_s=self.tokens_per_s)
        return d


@dataclass(slots=True)
class GenerationResult:
    ids: list[int]
    text: str
    finish_reason: str
    metrics: Metrics
    method: str = "ar"

    def to_dict(self) -> dict:
        return {"text": self.text, "ids": self.ids, "finish_reason": self.finish_reason,
                "method": self.method, "metrics": self.metrics.to_dict()}
