from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SpecConfig(_message.Message):
    __slots__ = ("method", "draft", "gamma", "kappa", "exit_layer", "budget", "branch_batch", "confidence", "draft_layers", "draft_model", "adapter", "exit_head", "vocab_trim", "streams", "stream_layers", "ngram_min", "ngram_max", "rule", "ngram_datastore", "rollout_stop", "pre_budget", "window_stop", "draft_quant", "int8_calib", "combine_min", "draft_prefill", "catch_up", "fill_window")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    KAPPA_FIELD_NUMBER: _ClassVar[int]
    EXIT_LAYER_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    BRANCH_BATCH_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    DRAFT_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    EXIT_HEAD_FIELD_NUMBER: _ClassVar[int]
    VOCAB_TRIM_FIELD_NUMBER: _ClassVar[int]
    STREAMS_FIELD_NUMBER: _ClassVar[int]
    STREAM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NGRAM_MIN_FIELD_NUMBER: _ClassVar[int]
    NGRAM_MAX_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    NGRAM_DATASTORE_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_STOP_FIELD_NUMBER: _ClassVar[int]
    PRE_BUDGET_FIELD_NUMBER: _ClassVar[int]
    WINDOW_STOP_FIELD_NUMBER: _ClassVar[int]
    DRAFT_QUANT_FIELD_NUMBER: _ClassVar[int]
    INT8_CALIB_FIELD_NUMBER: _ClassVar[int]
    COMBINE_MIN_FIELD_NUMBER: _ClassVar[int]
    DRAFT_PREFILL_FIELD_NUMBER: _ClassVar[int]
    CATCH_UP_FIELD_NUMBER: _ClassVar[int]
    FILL_WINDOW_FIELD_NUMBER: _ClassVar[int]
    method: str
    draft: str
    gamma: int
    kappa: int
    exit_layer: int
    budget: int
    branch_batch: int
    confidence: float
    draft_layers: int
    draft_model: str
    adapter: str
    exit_head: str
    vocab_trim: str
    streams: int
    stream_layers: int
    ngram_min: int
    ngram_max: int
    rule: str
    ngram_datastore: str
    rollout_stop: str
    pre_budget: int
    window_stop: str
    draft_quant: str
    int8_calib: str
    combine_min: float
    draft_prefill: str
    catch_up: str
    fill_window: int
    def __init__(self, method: _Optional[str] = ..., draft: _Optional[str] = ..., gamma: _Optional[int] = ..., kappa: _Optional[int] = ..., exit_layer: _Optional[int] = ..., budget: _Optional[int] = ..., branch_batch: _Optional[int] = ..., confidence: _Optional[float] = ..., draft_layers: _Optional[int] = ..., draft_model: _Optional[str] = ..., adapter: _Optional[str] = ..., exit_head: _Optional[str] = ..., vocab_trim: _Optional[str] = ..., streams: _Optional[int] = ..., stream_layers: _Optional[int] = ..., ngram_min: _Optional[int] = ..., ngram_max: _Optional[int] = ..., rule: _Optional[str] = ..., ngram_datastore: _Optional[str] = ..., rollout_stop: _Optional[str] = ..., pre_budget: _Optional[int] = ..., window_stop: _Optional[str] = ..., draft_quant: _Optional[str] = ..., int8_calib: _Optional[str] = ..., combine_min: _Optional[float] = ..., draft_prefill: _Optional[str] = ..., catch_up: _Optional[str] = ..., fill_window: _Optional[int] = ...) -> None: ...

class DraftSampling(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed", "max_new_tokens")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    max_new_tokens: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., max_new_tokens: _Optional[int] = ...) -> None: ...

class Open(_message.Message):
    __slots__ = ("session_id", "prompt_ids", "first_token", "gamma", "spec", "sampling", "ack_signals", "defer_first", "push_branches", "prompt_kv")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    ACK_SIGNALS_FIELD_NUMBER: _ClassVar[int]
    DEFER_FIRST_FIELD_NUMBER: _ClassVar[int]
    PUSH_BRANCHES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_KV_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    first_token: int
    gamma: int
    spec: SpecConfig
    sampling: DraftSampling
    ack_signals: bool
    defer_first: bool
    push_branches: bool
    prompt_kv: bool
    def __init__(self, session_id: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., first_token: _Optional[int] = ..., gamma: _Optional[int] = ..., spec: _Optional[_Union[SpecConfig, _Mapping]] = ..., sampling: _Optional[_Union[DraftSampling, _Mapping]] = ..., ack_signals: _Optional[bool] = ..., defer_first: _Optional[bool] = ..., push_branches: _Optional[bool] = ..., prompt_kv: _Optional[bool] = ...) -> None: ...

class PromptKV(_message.Message):
    __slots__ = ("layer", "start", "length", "total", "kv_heads", "head_dim", "k", "v", "layers")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    V_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    start: int
    length: int
    total: int
    kv_heads: int
    head_dim: int
    k: bytes
    v: bytes
    layers: int
    def __init__(self, layer: _Optional[int] = ..., start: _Optional[int] = ..., length: _Optional[int] = ..., total: _Optional[int] = ..., kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., k: _Optional[bytes] = ..., v: _Optional[bytes] = ..., layers: _Optional[int] = ...) -> None: ...

class First(_message.Message):
    __slots__ = ("token", "gamma")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    token: int
    gamma: int
    def __init__(self, token: _Optional[int] = ..., gamma: _Optional[int] = ...) -> None: ...

class EarlyExitSignal(_message.Message):
    __slots__ = ("step", "kappa", "top_ids", "top_logprobs", "rows")
    STEP_FIELD_NUMBER: _ClassVar[int]
    KAPPA_FIELD_NUMBER: _ClassVar[int]
    TOP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    step: int
    kappa: int
    top_ids: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    rows: int
    def __init__(self, step: _Optional[int] = ..., kappa: _Optional[int] = ..., top_ids: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ..., rows: _Optional[int] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("step", "accepted", "token", "gamma", "taken")
    STEP_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    TAKEN_FIELD_NUMBER: _ClassVar[int]
    step: int
    accepted: int
    token: int
    gamma: int
    taken: bool
    def __init__(self, step: _Optional[int] = ..., accepted: _Optional[int] = ..., token: _Optional[int] = ..., gamma: _Optional[int] = ..., taken: _Optional[bool] = ...) -> None: ...

class Cancel(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Close(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TargetMessage(_message.Message):
    __slots__ = ("open", "signal", "verdict", "cancel", "close", "first", "kv")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    FIRST_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    open: Open
    signal: EarlyExitSignal
    verdict: Verdict
    cancel: Cancel
    close: Close
    first: First
    kv: PromptKV
    def __init__(self, open: _Optional[_Union[Open, _Mapping]] = ..., signal: _Optional[_Union[EarlyExitSignal, _Mapping]] = ..., verdict: _Optional[_Union[Verdict, _Mapping]] = ..., cancel: _Optional[_Union[Cancel, _Mapping]] = ..., close: _Optional[_Union[Close, _Mapping]] = ..., first: _Optional[_Union[First, _Mapping]] = ..., kv: _Optional[_Union[PromptKV, _Mapping]] = ...) -> None: ...

class DraftWindow(_message.Message):
    __slots__ = ("step", "ids", "probs", "vocab_size", "source")
    STEP_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    step: int
    ids: _containers.RepeatedScalarFieldContainer[int]
    probs: bytes
    vocab_size: int
    source: str
    def __init__(self, step: _Optional[int] = ..., ids: _Optional[_Iterable[int]] = ..., probs: _Optional[bytes] = ..., vocab_size: _Optional[int] = ..., source: _Optional[str] = ...) -> None: ...

class Branch(_message.Message):
    __slots__ = ("accepted", "token", "ids", "source")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    token: int
    ids: _containers.RepeatedScalarFieldContainer[int]
    source: str
    def __init__(self, accepted: _Optional[int] = ..., token: _Optional[int] = ..., ids: _Optional[_Iterable[int]] = ..., source: _Optional[str] = ...) -> None: ...

class Branches(_message.Message):
    __slots__ = ("step", "branches")
    STEP_FIELD_NUMBER: _ClassVar[int]
    BRANCHES_FIELD_NUMBER: _ClassVar[int]
    step: int
    branches: _containers.RepeatedCompositeFieldContainer[Branch]
    def __init__(self, step: _Optional[int] = ..., branches: _Optional[_Iterable[_Union[Branch, _Mapping]]] = ...) -> None: ...

class Ready(_message.Message):
    __slots__ = ("step",)
    STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    def __init__(self, step: _Optional[int] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...

class DraftStats(_message.Message):
    __slots__ = ("computed", "used", "hits", "misses", "branches", "by_source", "expand_s", "overrun_s", "verdict_s", "prepare_s", "pre_branches", "pre_hits", "taken", "early")
    class BySourceEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    COMPUTED_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    BRANCHES_FIELD_NUMBER: _ClassVar[int]
    BY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    EXPAND_S_FIELD_NUMBER: _ClassVar[int]
    OVERRUN_S_FIELD_NUMBER: _ClassVar[int]
    VERDICT_S_FIELD_NUMBER: _ClassVar[int]
    PREPARE_S_FIELD_NUMBER: _ClassVar[int]
    PRE_BRANCHES_FIELD_NUMBER: _ClassVar[int]
    PRE_HITS_FIELD_NUMBER: _ClassVar[int]
    TAKEN_FIELD_NUMBER: _ClassVar[int]
    EARLY_FIELD_NUMBER: _ClassVar[int]
    computed: int
    used: int
    hits: int
    misses: int
    branches: int
    by_source: _containers.ScalarMap[str, int]
    expand_s: float
    overrun_s: float
    verdict_s: float
    prepare_s: float
    pre_branches: int
    pre_hits: int
    taken: int
    early: int
    def __init__(self, computed: _Optional[int] = ..., used: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., branches: _Optional[int] = ..., by_source: _Optional[_Mapping[str, int]] = ..., expand_s: _Optional[float] = ..., overrun_s: _Optional[float] = ..., verdict_s: _Optional[float] = ..., prepare_s: _Optional[float] = ..., pre_branches: _Optional[int] = ..., pre_hits: _Optional[int] = ..., taken: _Optional[int] = ..., early: _Optional[int] = ...) -> None: ...

class DraftMessage(_message.Message):
    __slots__ = ("window", "ready", "error", "stats", "branches")
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    BRANCHES_FIELD_NUMBER: _ClassVar[int]
    window: DraftWindow
    ready: Ready
    error: Error
    stats: DraftStats
    branches: Branches
    def __init__(self, window: _Optional[_Union[DraftWindow, _Mapping]] = ..., ready: _Optional[_Union[Ready, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., stats: _Optional[_Union[DraftStats, _Mapping]] = ..., branches: _Optional[_Union[Branches, _Mapping]] = ...) -> None: ...
