"""One validated configuration object for speculative decoding (sd and mirror)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

METHODS = ("ar", "sd", "mirror")
DRAFTS = ("self", "model", "ngram", "streaming", "ngram+self", "ngram+streaming", "ngram+model")
RULES = ("auto", "stochastic", "match")
ROLLOUT_STOPS = ("predict", "verdict", "reply")
DRAFT_BACKENDS = ("torch", "onnx")
DRAFT_QUANTS = ("none", "int8", "gguf")
EXIT_QUANTS = ("none", "int8")
DRAFT_PREFILLS = ("auto", "fp32", "draft")
CATCH_UPS = ("whole", "lazy")


@dataclass(slots=True)
class SpecConfig:
    method: str = "mirror"
    draft: str = "ngram+self"
    gamma: int = 5  # draft window
    kappa: int = 8  # early-exit candidates per window position
    exit_layer: int = 0  # l_e; 0 -> 2N/3 of the target's layers
    budget: int = 16  # max hypotheses (j, v) the draft expands per step
    branch_batch: int = 8  # hypotheses expanded per batched draft pass (anytime granularity)
    confidence: float = 0.0  # Kangaroo early stop: end a draft branch when top-1 prob < this (0 = off)
    draft_layers: int = 4  # self-draft: target layers [0, k)
    draft_model: str | None = None  # separate draft: GGUF / HF path sharing the target's tokenizer;
    # "target": a copy of the target itself (with draft_quant, an int8 copy)
    # A 'model' draft's linear layers as int8 (models/quant.py; with draft_backend="onnx", ONNX
    # Runtime MatMulInteger graphs - onnx/export.py): "none" or "int8"; or "gguf": the GGUF
    # file's own 4-/8-bit blocks (the draft model's, or the target's for draft_model=target) in
    # ONNX Runtime MatMulNBits graphs - onnx/blocks.py; draft_backend="onnx" only. int8_calib: the
    # SmoothQuant activation statistics (`mirror calibrate-int8`; "bundled" for the bundled model;
    # None: plain int8, much less accurate)
    draft_quant: str = "none"
    int8_calib: str | None = None
    # How a network draft prefills the prompt: "fp32" runs the draft model's full-precision
    # weights as an ONNX Runtime graph (the onnx target's: a GEMM at prefill widths, faster
    # than the 4-bit blocks' int8 path, and the prompt's KV is the model's exact one) for every
    # prompt - an error for a draft without those weights; "draft" runs the draft's own graph;
    # "auto" takes fp32 where the draft holds those weights (the built draft_quant=gguf graph
    # on the CPU provider) and the prompt is long enough for it to pay
    # (decoding.drafters.network.PREFILL_MIN), the draft's own graph otherwise.
    draft_prefill: str = "auto"
    adapter: str | None = None  # trained self-draft / streaming artifact (safetensors)
    exit_head: str | None = None  # trained early-exit head artifact
    exit_trim: str | None = None  # VocabTrim set for the early-exit head (top-kappa among it)
    # the trimmed early-exit head's weights on the onnx target: "int8" (8-bit blocks of 32,
    # ONNX Runtime's MatMulNBits) reads a quarter of the bytes; the head only ranks candidates
    # for the draft, so output stays exact either way
    exit_quant: str = "none"
    # Mirror-SD, greedy or deterministic windows: the target's suffix verifies the window only up
    # to the first draft token outside the early exit's top-`verify_cut` at its position (where the
    # exit predicts the rejection), so fewer rows pay for layers [l_e, N) and the LM head. The
    # target still decides every committed token; a wrong prediction only ends that window early
    # (its next token is then the target's own). 0 = off (the whole window); at most kappa.
    verify_cut: int = 0
    vocab_trim: str | None = None  # VocabTrim token set (file) for the draft head
    streams: int = 0  # speculative streaming: lookahead streams gamma_s (0 = off)
    stream_layers: int = 1  # N_s: top draft layers with multi-stream attention
    ngram_min: int = 2
    ngram_max: int = 4
    ngram_datastore: str | None = None  # n-gram model of the target's own text (mirror train-draft)
    # n-gram windows cut where one more token is expected to return less than it costs the
    # target to verify (mirror calibrate-stop; drafters/window_stop.py); None = always gamma
    window_stop: str | None = None
    # ngram+<network> drafts: use the n-gram window only when its expected number of accepted
    # tokens (scored by the window-stop table: `window_stop`, else the bundled one) is at least
    # this, the network's window otherwise; 0 = whenever the n-gram proposes anything
    combine_min: float = 0.0
    rule: str = "auto"  # acceptance at T > 0 ("auto" = stochastic); greedy when temperature == 0
    # Mirror-SD with the draft behind the channel: a branch rollout stops when the verdict
    # arrives ("verdict"), or also before a draft step predicted to end after the verdict's
    # arrival, estimated from earlier steps' signal -> verdict times ("predict"): a step already
    # running when the verdict comes delays the next window by its remainder. "reply": the
    # verdict is answered at once with a greedy rollout's tokens so far (Drafter.peek), and the
    # step still running becomes the next window's first draft step instead of a delay.
    rollout_stop: str = "predict"
    # Mirror-SD with the draft behind the channel: the draft sends its finished rollouts to the
    # target before the verdict, so a hit's window is on the target's side already (no round
    # trip); windows with draft distributions (sampled network drafts) are never pushed.
    push_branches: bool = True
    # Mirror-SD with a network draft: hypotheses expanded as soon as the window is sent, ranked by
    # the draft's own distribution over the window (the whole window accepted and its own next
    # token, or a runner-up at a position; greedy: weighed by its agreement rate so far), so
    # the draft works through the target's prefix too instead of waiting for the signal; the
    # signal's hypotheses follow, skipping those already done (0 = off: signal only).
    pre_budget: int = 0
    # Mirror-SD with pre-signal rollouts (pre_budget) of a network draft, greedy: how the draft
    # gives another drafter's window (a combined draft's n-gram window) its KV first - "whole":
    # the window in one forward; "lazy": in short chunks, stopping where the draft's own top-1
    # departs from the window (the likely rejection: its own next token there is the rollout's
    # hypothesis); the rest is fed only if the signal's hypotheses need it.
    catch_up: str = "whole"
    # Mirror-SD with the draft behind the channel: at a verdict whose hypothesis is being rolled
    # out, that rollout goes on until the window holds this many tokens (at most gamma) before
    # it is sent - the target waits a draft step or two rather than verify a short window; other
    # rollouts stop as rollout_stop says. 0 = off.
    fill_window: int = 0
    # Where the draft network runs: "torch" (eager, this process) or "onnx" (ONNX Runtime on an
    # execution provider, e.g. an NPU; see mirror/onnx). onnx_dir: a `mirror export-draft` folder
    # (None: export this spec's draft on first use into a cache folder, onnx_max_len positions).
    draft_backend: str = "torch"
    onnx_dir: str | None = None
    onnx_providers: list | None = None  # priority list: names or {"name", "options"}; None = CPU
    onnx_strict: bool = False  # raise instead of falling back from the preferred provider
    onnx_threads: int = 1  # intra-op threads per draft session (1: one pinned draft core)
    onnx_inter_threads: int = 1
    onnx_max_len: int = 2048

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.draft not in DRAFTS:
            raise ValueError(f"unknown draft {self.draft!r}; choose one of {', '.join(DRAFTS)}")
        if self.rollout_stop not in ROLLOUT_STOPS:
            raise ValueError(f"unknown rollout_stop {self.rollout_stop!r}; choose one of {', '.join(ROLLOUT_STOPS)}")
        if self.rule not in RULES:
            raise ValueError(f"unknown acceptance rule {self.rule!r}; choose one of {', '.join(RULES)}")
        for name, lo in (("gamma", 1), ("kappa", 1), ("budget", 1), ("branch_batch", 1),
                         ("draft_layers", 1), ("stream_layers", 1), ("ngram_min", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if not isinstance(self.pre_budget, int) or isinstance(self.pre_budget, bool) or self.pre_budget < 0:
            raise ValueError(f"pre_budget must be an integer >= 0, got {self.pre_budget!r}")
        if self.gamma > 16:
            raise ValueError(f"gamma must be <= 16, got {self.gamma}")
        if self.exit_layer < 0:
            raise ValueError(f"exit_layer must be >= 0, got {self.exit_layer}")
        if not 0.0 <= self.confidence < 1.0:
            raise ValueError(f"confidence must be in [0, 1), got {self.confidence}")
        if isinstance(self.combine_min, bool) or not isinstance(self.combine_min, (int, float)) \
                or not 0.0 <= self.combine_min <= self.gamma:
            raise ValueError(f"combine_min must be a number in [0, gamma={self.gamma}], got {self.combine_min!r}")
        if self.combine_min and not self.draft.startswith("ngram+"):
            raise ValueError(f"combine_min applies to a combined draft (ngram+self, ngram+model, ...), "
                             f"not to {self.draft!r}")
        if self.streams < 0:
            raise ValueError(f"streams must be >= 0, got {self.streams}")
        if self.ngram_max < self.ngram_min:
            raise ValueError("ngram_max must be >= ngram_min")
        if "model" in self.draft and not self.draft_model:
            raise ValueError("draft 'model' needs draft_model (a GGUF file or Hugging Face folder)")
        if self.draft_quant not in DRAFT_QUANTS:
            raise ValueError(f"unknown draft_quant {self.draft_quant!r}; choose one of {', '.join(DRAFT_QUANTS)}")
        if self.draft_quant != "none" and "model" not in self.draft:
            raise ValueError(f"draft_quant applies to a 'model' draft (e.g. draft=model, draft_model=target), "
                             f"not to {self.draft!r}")
        if self.draft_prefill not in DRAFT_PREFILLS:
            raise ValueError(f"unknown draft_prefill {self.draft_prefill!r}; choose one of {', '.join(DRAFT_PREFILLS)}")
        if isinstance(self.fill_window, bool) or not isinstance(self.fill_window, int) \
                or not 0 <= self.fill_window <= self.gamma:
            raise ValueError(f"fill_window must be an integer in [0, gamma={self.gamma}], got {self.fill_window!r}")
        if self.catch_up not in CATCH_UPS:
            raise ValueError(f"unknown catch_up {self.catch_up!r}; choose one of {', '.join(CATCH_UPS)}")
        if self.exit_quant not in EXIT_QUANTS:
            raise ValueError(f"unknown exit_quant {self.exit_quant!r}; choose one of {', '.join(EXIT_QUANTS)}")
        if self.exit_quant != "none" and not self.exit_trim:
            raise ValueError("exit_quant applies to a trimmed early-exit head (set exit_trim)")
        if isinstance(self.verify_cut, bool) or not isinstance(self.verify_cut, int) \
                or not 0 <= self.verify_cut <= self.kappa:
            raise ValueError(f"verify_cut must be an integer in [0, kappa={self.kappa}], got {self.verify_cut!r}")
        if self.draft_backend not in DRAFT_BACKENDS:
            raise ValueError(f"unknown draft backend {self.draft_backend!r}; choose one of {', '.join(DRAFT_BACKENDS)}")
        for name, lo in (("onnx_threads", 1), ("onnx_inter_threads", 1), ("onnx_max_len", 2)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if not isinstance(self.push_branches, bool):
            raise ValueError(f"push_branches must be true or false, got {self.push_branches!r}")
        if not isinstance(self.onnx_strict, bool):
            raise ValueError(f"onnx_strict must be true or false, got {self.onnx_strict!r}")
        if self.draft_backend == "onnx":  # (an n-gram-only draft has no network: the backend is moot)
            from .onnx.providers import parse_providers

            parse_providers(self.onnx_providers)  # raises on a malformed list

    def resolve_exit_layer(self, n_layers: int) -> int:
        le = self.exit_layer or max(1, (2 * n_layers) // 3)
        if not 1 <= le < n_layers:
            raise ValueError(f"exit_layer must be in [1, {n_layers - 1}] for a {n_layers}-layer target, got {le}")
        return le

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SpecConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown speculative config keys: {', '.join(sorted(unknown))}")
        return cls(**d)
