"""Execution-provider selection for ONNX Runtime sessions, with fallback made visible.

A request is a priority list; each entry is a provider name or `{"name": ..., "options": {...}}`:

    [{"name": "QNNExecutionProvider", "options": {"backend_path": "libQnnHtp.so"}},
     {"name": "OpenVINOExecutionProvider", "options": {"device_type": "NPU"}},
     "CoreMLExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]

ONNX Runtime quietly drops providers that this build lacks or that fail to register and runs
on the CPU instead; a draft meant for an NPU that silently runs on a host core destroys the
Mirror-SD overlap. So after creating a session we compare `session.get_providers()` with the
request and record the outcome in a status dict; a fallback warns, and `strict=True` raises.
Strict mode also sets `session.disable_cpu_ep_fallback`, so session creation fails when some
node of the graph cannot be placed on the preferred accelerator (partial offload).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

CPU = "CPUExecutionProvider"


class ProviderFallbackError(RuntimeError):
    """strict mode: the preferred execution provider is not the one running the graph."""


class ProviderFallbackWarning(RuntimeWarning):
    pass


@dataclass(slots=True)
class ProviderRequest:
    name: str
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.endswith("ExecutionProvider"):
            raise ValueError(f"execution provider names end in 'ExecutionProvider', got {self.name!r}")
        if not isinstance(self.options, dict):
            raise ValueError(f"options of {self.name} must be a dict, got {type(self.options).__name__}")

    def to_dict(self) -> dict:
        return {"name": self.name, "options": dict(self.options)}


def parse_providers(entries) -> list[ProviderRequest]:
    """A priority list of names / {"name", "options"} dicts -> requests (default: CPU only)."""
    if entries is None:
        return [ProviderRequest(CPU)]
    if isinstance(entries, (str, dict)):
        entries = [entries]
    out = []
    for e in entries:
        if isinstance(e, ProviderRequest):
            out.append(e)
        elif isinstance(e, str):
            out.append(ProviderRequest(e))
        elif isinstance(e, dict):
            unknown = set(e) - {"name", "options"}
            if unknown or "name" not in e:
                raise ValueError(f"a provider entry is a name or {{'name', 'options'}}, got {e!r}")
            out.append(ProviderRequest(e["name"], dict(e.get("options") or {})))
        else:
            raise ValueError(f"a provider entry is a name or {{'name', 'options'}}, got {e!r}")
    if not out:
        raise ValueError("the execution provider list is empty")
    names = [r.name for r in out]
    if len(set(names)) != len(names):
        raise ValueError(f"execution provider listed twice: {names}")
    return out


def session_options(intra_threads: int = 1, inter_threads: int = 1, strict_offload: bool = False,
                    config: dict | None = None):
    """Per-session threads (default 1: the draft gets one pinned core) and sequential execution."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = intra_threads
    so.inter_op_num_threads = inter_threads
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # errors only: fallbacks are reported by `provider_status` instead
    if strict_offload:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    for k, v in (config or {}).items():
        so.add_session_config_entry(k, str(v))
    from ..models.ort_target import join_global_pool

    join_global_pool(so)  # an onnx target in this process made ONNX Runtime's pool process-wide
    return so


def create_session(path: str, requests: list[ProviderRequest], *, strict: bool = False,
                   intra_threads: int = 1, inter_threads: int = 1, config: dict | None = None):
    """An InferenceSession on the best available requested provider -> (session, status).

    Providers this onnxruntime build lacks are dropped before the session is created (asking
    ONNX Runtime for them is an error in some versions and a silent no-op in others); the CPU
    provider is always kept last, unless strict, so that the graph can run at all."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    usable = [r for r in requests if r.name in available]
    if not strict and all(r.name != CPU for r in usable):
        usable.append(ProviderRequest(CPU))
    if not usable:  # strict, and nothing asked for exists here
        raise ProviderFallbackError(_message(requests, available, []))
    preferred = requests[0].name
    so = session_options(intra_threads, inter_threads, strict and preferred != CPU, config)
    try:
        sess = ort.InferenceSession(path, so, providers=[r.name for r in usable],
                                    provider_options=[r.options for r in usable])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidArgument types
        if strict:
            raise ProviderFallbackError(f"{_message(requests, available, [])}: {e}") from e
        raise
    status = provider_status(requests, available, sess.get_providers())
    status["strict"] = strict
    if status["fallback"]:
        msg = _message(requests, available, status["active"])
        if strict:
            raise ProviderFallbackError(msg)
        warnings.warn(msg, ProviderFallbackWarning, stacklevel=3)
    return sess, status


def provider_status(requests: list[ProviderRequest], available: list[str], active: list[str]) -> dict:
    """What was asked, what exists, what runs. `fallback` is true when the preferred (first)
    provider is not the one ONNX Runtime put first, i.e. the graph runs somewhere else."""
    asked = [r.name for r in requests]
    running = active[0] if active else None
    return {
        "requested": asked,
        "available": list(available),
        "unavailable": [n for n in asked if n not in available],
        "active": list(active),
        "provider": running,
        "fallback": running != asked[0],
        "cpu_fallback": running == CPU and asked[0] != CPU,
    }


def _message(requests, available, active) -> str:
    asked = [r.name for r in requests]
    missing = [n for n in asked if n not in available]
    where = active[0] if active else "nothing"
    return (f"ONNX Runtime draft asked for {asked} but runs on {where}"
            + (f" ({', '.join(missing)} not available in this onnxruntime build; available: {available})"
               if missing else ""))
