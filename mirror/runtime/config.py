"""Deployment configuration (deploy/*.yaml): where the target and draft run and how they talk.

One file describes a whole deployment - the embedded default, one host with two devices, or a
multi-node Ray cluster - and the same file is used by `mirror serve --config`, `mirror generate
--config` and `ray job submit ... python -m mirror.serve --config`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..spec_config import SpecConfig

# Ray's built-in "NPU" resource means Huawei Ascend; the draft accelerator gets its own name.
DEFAULT_DRAFT_RESOURCE = "mirror_draft_accel"
STRATEGIES = ("STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD")
PROVIDER_NAMES = ("QNNExecutionProvider", "OpenVINOExecutionProvider", "CoreMLExecutionProvider",
                  "CUDAExecutionProvider", "DmlExecutionProvider", "ROCMExecutionProvider",
                  "TensorrtExecutionProvider", "CPUExecutionProvider")


def _build(cls, d: dict | None, where: str):
    d = dict(d or {})
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"{where}: unknown keys {', '.join(sorted(unknown))} (allowed: {', '.join(sorted(names))})")
    return cls(**d)


@dataclass(slots=True)
class RayConfig:
    address: str | None = None  # None: start a local Ray in-process; "auto": join the cluster
    namespace: str = "mirror"
    num_cpus: int | None = None  # for the embedded local Ray
    resources: dict = field(default_factory=dict)  # extra custom resources for the embedded Ray
    include_dashboard: bool = False


@dataclass(slots=True)
class TargetConfig:
    num_workers: int = 1  # tensor-parallel degree
    device: str = "cpu"  # "cpu" or "cuda" (each worker gets its own GPU)
    num_gpus: float = 0.0  # per worker
    num_cpus: float = 1.0
    threads: int = 1
    cpu_affinity: list[int] | None = None  # cores for worker 0 (then the next ones); None = leave
    # onnx backend, threads 1: cores the prompt's prefill may use (e.g. [0, 1] beside cpu_affinity
    # [0]: the draft worker's core too, idle then - the draft takes the prompt's K/V from the
    # target instead of prefilling it, where it would compute the same). None = cpu_affinity's
    prefill_cores: list[int] | None = None
    # the attention of those prefill sessions: "fused" (com.microsoft GroupQueryAttention, 9-19%
    # less prefill time; not bit for bit the decode graphs') or "materialized" (the decode graphs)
    prefill_attention: str = "fused"
    tp_backend: str = "auto"  # gloo on CPU, nccl on CUDA
    resource: str | None = None  # optional custom Ray resource that marks target nodes
    # "torch" (eager), "onnx" (ONNX Runtime graphs: fp32, CPU, one worker) or "auto": onnx where it
    # applies and ONNX Runtime is installed, else torch (see resolve_backend)
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError("target.num_workers must be >= 1")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"target.device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and self.num_gpus <= 0:
            raise ValueError("target.device cuda needs num_gpus > 0")
        if self.tp_backend not in ("auto", "gloo", "nccl"):
            raise ValueError("target.tp_backend must be auto, gloo or nccl")
        if self.backend not in TARGET_BACKENDS:
            raise ValueError(f"target.backend must be one of {', '.join(TARGET_BACKENDS)}, got {self.backend!r}")
        if self.backend == "onnx" and (self.device != "cpu" or self.num_workers != 1):
            raise ValueError("target.backend onnx runs one CPU worker (device cpu, num_workers 1)")
        if self.prefill_cores is not None and (
                not isinstance(self.prefill_cores, list) or not self.prefill_cores
                or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in self.prefill_cores)):
            raise ValueError(f"target.prefill_cores must be a non-empty list of core ids >= 0, got {self.prefill_cores!r}")
        from ..models.ort_target import ATTENTION

        if self.prefill_attention not in ATTENTION:
            raise ValueError(f"target.prefill_attention must be one of {', '.join(ATTENTION)}, "
                             f"got {self.prefill_attention!r}")


    def resolve_backend(self, dtype: str = "fp32") -> str:
        """The backend the target runs on: `backend`, with "auto" resolved to onnx for one fp32 CPU
        worker when onnx and onnxruntime are importable (plain decoding ~1.7-1.9x faster there,
        README "The onnx target backend"), torch otherwise (GPUs, tensor parallelism, bf16)."""
        if self.backend != "auto":
            return self.backend
        if self.device != "cpu" or self.num_workers != 1 or dtype != "fp32":
            return "torch"
        from ..models.ort_target import available

        return "onnx" if available() else "torch"


TARGET_BACKENDS = ("auto", "torch", "onnx")


@dataclass(slots=True)
class DraftConfig:
    backend: str = "torch"  # "torch" (a GPU or CPU cores) or "onnx" (ONNX Runtime, the NPU path)
    device: str = "cpu"  # torch backend: "cpu" or "cuda:N"
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    resource: str = DEFAULT_DRAFT_RESOURCE  # custom Ray resource of the draft accelerator
    resource_amount: float = 1.0
    threads: int = 1
    cpu_affinity: list[int] | None = None
    providers: list = field(default_factory=lambda: ["CPUExecutionProvider"])  # onnx: priority list
    strict_providers: bool = False  # onnx: fail instead of falling back to CPU
    onnx_dir: str | None = None  # onnx: exported draft (exported on first use when None)
    onnx_max_len: int | None = None  # onnx: cache positions of an export made on first use (None: 2048);
    # every drafted token reads the whole static cache, so a deployment of short requests drafts faster with less
    deadline_ms: float = 2000.0  # a draft reply slower than this is treated as a dead draft
    restart: bool = True  # restart a dead draft in the background
    # True: no draft worker - the draft runs inside the target worker's process, on its cores and
    # ONNX Runtime pool, without the token channel (num_cpus, threads, cpu_affinity and the
    # resource above then do not apply). For one CPU whose cores would otherwise be split between
    # the two: both phases of a step get every core (README "One CPU: the draft beside the target")
    colocate: bool = False

    def __post_init__(self) -> None:
        if self.backend not in ("torch", "onnx"):
            raise ValueError(f"draft.backend must be torch or onnx, got {self.backend!r}")
        if self.resource.upper() == "NPU":
            raise ValueError("draft.resource: Ray's built-in 'NPU' resource means Huawei Ascend; "
                             f"use a name of your own such as {DEFAULT_DRAFT_RESOURCE!r}")
        for p in self.providers:
            name = p if isinstance(p, str) else (p or {}).get("name")
            if name not in PROVIDER_NAMES:
                raise ValueError(f"draft.providers: unknown execution provider {name!r}")
        if self.deadline_ms <= 0:
            raise ValueError("draft.deadline_ms must be > 0")
        if self.onnx_max_len is not None and (isinstance(self.onnx_max_len, bool)
                                              or not isinstance(self.onnx_max_len, int) or self.onnx_max_len < 2):
            raise ValueError(f"draft.onnx_max_len must be an integer >= 2, got {self.onnx_max_len!r}")


@dataclass(slots=True)
class ServerConfig:
    host: str = "127.0.0.1"  # loopback unless configured
    port: int = 50051
    max_concurrent_requests: int = 4


BUNDLED_ARTIFACT_FIELDS = ("ngram_datastore", "exit_head", "exit_trim", "vocab_trim", "window_stop")


@dataclass(slots=True)
class DeploymentConfig:
    name: str = "local"
    model: str | None = None  # None: the bundled default
    dtype: str = "fp32"
    placement: str = "STRICT_PACK"
    ray: RayConfig = field(default_factory=RayConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    speculative: SpecConfig = field(default_factory=SpecConfig)
    server: ServerConfig = field(default_factory=ServerConfig)

    def __post_init__(self) -> None:
        if self.placement not in STRATEGIES:
            raise ValueError(f"placement must be one of {', '.join(STRATEGIES)}, got {self.placement!r}")
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"dtype must be fp32 or bf16, got {self.dtype!r}")
        if self.draft.colocate and self.target.num_workers != 1:
            raise ValueError("draft.colocate runs the draft in the target worker's process: target.num_workers must be 1")
        if self.target.backend == "onnx" and self.dtype != "fp32":
            raise ValueError("target.backend onnx runs fp32 (dtype: fp32)")
        bundled = [f for f in BUNDLED_ARTIFACT_FIELDS if getattr(self.speculative, f) == "bundled"]
        if self.model is not None and bundled:
            raise ValueError(f"speculative: {', '.join(bundled)}: 'bundled' artifacts belong to the bundled "
                             f"model, not {self.model}; give paths made by `mirror train-draft` for it")

    def with_model(self, model: str) -> "DeploymentConfig":
        """This deployment on another model; the default's 'bundled' artifacts are dropped."""
        import dataclasses

        drop = {f: None for f in BUNDLED_ARTIFACT_FIELDS if getattr(self.speculative, f) == "bundled"}
        if "exit_trim" in drop:  # (quantizes the trimmed head: nothing left to quantize)
            drop["exit_quant"] = "none"
        spec = dataclasses.replace(self.speculative, **drop)
        if spec.draft_quant == "gguf" and spec.draft_model == "target" and "ngram" in spec.draft.split("+") \
                and not str(model).endswith(".gguf"):  # no GGUF blocks to draft with: the n-gram alone
            from ..decoding.factory import ngram_part

            spec = ngram_part(spec)
        return dataclasses.replace(self, model=model, speculative=spec)

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "DeploymentConfig":
        d = dict(d or {})
        allowed = {f.name for f in fields(cls)}
        unknown = set(d) - allowed
        if unknown:
            raise ValueError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
        try:
            spec = SpecConfig.from_dict(d.pop("speculative", None) or {})
        except ValueError as e:
            raise ValueError(f"{where}: speculative: {e}") from e
        return cls(ray=_build(RayConfig, d.pop("ray", None), f"{where}: ray"),
                   target=_build(TargetConfig, d.pop("target", None), f"{where}: target"),
                   draft=_build(DraftConfig, d.pop("draft", None), f"{where}: draft"),
                   server=_build(ServerConfig, d.pop("server", None), f"{where}: server"),
                   speculative=spec, **d)

    @classmethod
    def local(cls) -> "DeploymentConfig":
        """The embedded default - the same as deploy/local.yaml (a test keeps them equal), so
        `mirror generate` works from an installed package too."""
        return cls(name="local", placement="STRICT_PACK",
                   target=TargetConfig(num_cpus=1, threads=1, cpu_affinity=[0], prefill_cores=[0, 1]),
                   draft=DraftConfig(backend="onnx", num_cpus=1, threads=1, cpu_affinity=[1], deadline_ms=2000.0),
                   speculative=SpecConfig(method="mirror", draft="ngram+model", combine_min=1.2, draft_model="target",
                                          draft_quant="gguf", pre_budget=1, budget=1, branch_batch=1, gamma=5,
                                          rollout_stop="verdict", kappa=8, ngram_datastore="bundled", exit_head="bundled",
                                          exit_trim="bundled", exit_quant="int8"))

    @classmethod
    def load(cls, path: str) -> "DeploymentConfig":
        import yaml

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"deployment config not found: {path}")
        with open(p) as f:
            d = yaml.safe_load(f)
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        return cls.from_dict(d, where=str(path))

    def to_dict(self) -> dict:
        return asdict(self)
