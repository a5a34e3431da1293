"""Ray actors: TargetWorker (the target, optionally tensor-parallel) and DraftWorker (the draft on
its own accelerator, serving the gRPC token channel).

Placement: target workers ask for GPUs (`num_gpus`; CPU when there is none) and optionally a
custom target resource; the draft asks for a custom resource of its own (`mirror_draft_accel`
by default - Ray's built-in `NPU` means Huawei Ascend) plus a GPU when its backend is another
GPU. Each worker pins itself to its own cores (`os.sched_setaffinity`) and thread count, so on
a 2-core machine the target and the draft really run side by side.

Per request TargetWorker runs `generate_speculative` - the same loop as in-process - with the
draft behind the channel (`DegradingDraftPipeline`): the early-exit signal leaves before the
suffix runs and the verdict comes back as the next window. If the draft dies, stalls past the
deadline or its channel breaks, the pipeline switches to empty windows and the target finishes
alone (plain decoding through the same verification path: the same tokens).

With `draft.colocate` there is no DraftWorker: the target worker builds the draft in its own
process (DraftHost) and runs it between its calls, on its cores and ONNX Runtime pool - for one
CPU, where splitting the cores between two workers leaves each phase of an SD step one core.
"""
from __future__ import annotations

import logging
import os
import threading

import ray

from ..decoding.drafters.base import DraftStats
from ..decoding.messages import DraftWindow, EarlyExitSignal, Verdict
from ..decoding.speculative import DraftPipeline
from ..sampling import SamplingParams
from ..spec_config import SpecConfig
from .config import DeploymentConfig
from .remote_generate import RemoteDraftPipeline

log = logging.getLogger(__name__)
OPEN_TIMEOUT_S = 120.0  # opening a session may build the draft (load an adapter, export ONNX)


def pin(cores: list[int] | None, threads: int) -> dict:
    """Pin this process to `cores` (those that exist here) and set torch's thread count."""
    import torch

    applied = None
    if cores:
        avail = set(os.sched_getaffinity(0)) | set(range(os.cpu_count() or 1))
        want = [c for c in cores if c in avail]
        if want:
            os.sched_setaffinity(0, want)
            applied = want
    torch.set_num_threads(max(1, threads))
    return {"cores": sorted(os.sched_getaffinity(0)), "pinned": applied, "threads": torch.get_num_threads()}


def _load(deploy: DeploymentConfig, tokenizer: bool = True):
    import torch

    from ..models import load_model

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[deploy.dtype]
    return load_model(deploy.model, dtype=dtype, tokenizer=tokenizer)


class DegradingDraftPipeline(RemoteDraftPipeline):
    """The remote draft, or - once it fails - no draft: empty windows, target-only decoding."""

    def __init__(self, connect, spec: SpecConfig, params: SamplingParams, prompt_kv: bool = False):
        self.connect = connect
        super().__init__(None, spec, params, prompt_kv=prompt_kv)
        self.degraded: str | None = None

    def _fail(self, what: str, e: Exception) -> DraftWindow:
        if self.degraded is None:
            self.degraded = f"{what}: {type(e).__name__}: {e}"
            log.warning("draft unavailable (%s); the target continues alone", self.degraded)
        if self.client is not None:
            try:
                self.client.shutdown()
            except Exception:  # already broken
                pass
        self.client = None
        return DraftWindow([])

    def begin(self, prompt: list[int]) -> None:
        try:
            self.client = self.connect()
            super().begin(prompt)  # returns at once: the draft prefills while the target does
        except Exception as e:
            self._fail("open", e)

    def adopt(self, prompt: list[int], target) -> bool:
        if self.client is None:
            return False
        try:
            return super().adopt(prompt, target)
        except Exception as e:
            self._fail("prompt K/V", e)
            return False

    def start(self, ctx: list[int], gamma: int) -> DraftWindow:
        if self.degraded is not None:
            return DraftWindow([])
        try:
            if self.client is None:
                self.client = self.connect()
            deadline, self.client.reply_timeout = self.client.reply_timeout, OPEN_TIMEOUT_S
            w = super().start(ctx, gamma)  # the first window: waits for the draft's prompt prefill
            self.client.reply_timeout = deadline
            return w
        except Exception as e:
            return self._fail("open", e)

    def on_signal(self, signal: EarlyExitSignal, should_stop=None) -> int:
        if self.client is not None:
            try:
                self.client.send_signal(signal)
            except Exception as e:
                self._fail("signal", e)
        return 0

    def on_verdict(self, verdict: Verdict, gamma: int) -> DraftWindow:
        if self.client is None:
            return DraftWindow([])
        try:
            return super().on_verdict(verdict, gamma)
        except Exception as e:
            return self._fail("verdict", e)

    def totals(self) -> DraftStats:
        if self.client is None:
            return self._stats or DraftStats()
        try:
            st = super().totals()
            self.client.shutdown()
            self.client = None
            return st
        except Exception as e:
            self._fail("close", e)
            return DraftStats()

    def release(self) -> None:
        if self.client is not None:
            try:
                self.client.shutdown()
            except Exception:
                pass
            self.client = None


def _has_onnxruntime() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def draft_placement(d, spec: SpecConfig) -> SpecConfig:
    """The deployment's draft section `d` decides where the draft runs (torch on a device, or
    ONNX Runtime, with its providers, threads and export shape), whatever the request's spec
    says (the token channel does not carry these)."""
    import dataclasses

    kw = {}
    names = {f.name for f in dataclasses.fields(SpecConfig)}
    if "draft_backend" in names:
        backend = d.backend
        if backend == "onnx" and not d.strict_providers and not _has_onnxruntime():
            log.warning("the ONNX Runtime draft is not available (pip install 'mirror-sd[onnx]'); "
                        "the draft runs on PyTorch")
            backend = "torch"
        kw["draft_backend"] = backend
        if backend == "onnx":
            kw.update({k: v for k, v in (("onnx_dir", d.onnx_dir), ("onnx_providers", d.providers),
                                          ("onnx_strict", d.strict_providers), ("onnx_threads", d.threads),
                                          ("onnx_max_len", d.onnx_max_len))
                       if k in names and (v is not None or k != "onnx_max_len")})
    return dataclasses.replace(spec, **kw) if kw else spec


class DraftHost:
    """Builds draft pipelines in this process: one network per draft configuration, shared by the
    requests (the draft worker's, or the target worker's own with `draft.colocate`)."""

    def _init_drafts(self, model, target_backend: str) -> None:
        self._draft_model, self._target_backend = model, target_backend
        self._nets: dict = {}
        self._lock = threading.Lock()
        if self.deploy.speculative.draft_quant == "gguf":  # the default's gguf graph: built now (~6 s), not
            try:                                              # on the first request
                self._network(self._apply_backend(self.deploy.speculative))
            except Exception as e:  # noqa: BLE001 - a request naming this draft gets the error
                log.warning("the deployment's draft network could not be built: %s", e)

    def _draft_pipeline(self, spec: SpecConfig, params: SamplingParams, max_len: int):
        from ..decoding.factory import build_drafter

        spec, net = self._network(self._apply_backend(spec))
        return LocalDraftPipeline(build_drafter(self._draft_model, spec, params, max_len, net=net,
                                                target_backend=self._target_backend), spec)

    def _network(self, spec: SpecConfig):
        """(spec, the draft's network or None): one network per draft configuration, shared by
        sessions (a combined n-gram + gguf draft whose model has no GGUF blocks: n-gram alone)."""
        from ..decoding.factory import network_or_ngram, ngram_part

        kind = next((k for k in spec.draft.split("+") if k != "ngram"), None)
        if kind is None:
            return spec, None
        key = (kind, spec.draft_layers, spec.draft_model, spec.adapter, spec.vocab_trim, spec.streams,
               spec.stream_layers, getattr(spec, "draft_backend", "torch"), spec.draft_quant, spec.int8_calib)
        with self._lock:
            if key not in self._nets:
                self._nets[key] = network_or_ngram(self._draft_model, spec, kind)[1]
            net = self._nets[key]
        return (spec, net) if net is not None else (ngram_part(spec), None)

    def _apply_backend(self, spec: SpecConfig) -> SpecConfig:
        return draft_placement(self.deploy.draft, spec)


class LocalDraftPipeline(DraftPipeline):
    """A draft pipeline in this process - the draft worker's, or the target worker's own with
    `draft.colocate` - so there is no channel to lose: it never degrades."""

    degraded = None

    def release(self) -> None:
        pass


@ray.remote
class DraftWorker(DraftHost):
    """Hosts draft pipelines behind the DraftChannel gRPC service on this node."""

    def __init__(self, deploy: dict, host: str = "0.0.0.0"):
        from .channel import DraftServer

        self.deploy = DeploymentConfig.from_dict(deploy)
        d = self.deploy.draft
        self.placement = pin(d.cpu_affinity, d.threads)
        self.lm = _load(self.deploy, tokenizer=False)
        # the backend the target verifies on (its auto resolved as the target worker does): the
        # n-gram window stop's cost curve
        self._init_drafts(self.lm.model, self.deploy.target.resolve_backend(self.deploy.dtype))
        self.server = DraftServer(self._make_pipeline, host=host, port=0).start()
        self.addr = f"{ray.util.get_node_ip_address()}:{self.server.port}"

    def _make_pipeline(self, req):
        return self._draft_pipeline(req.spec, req.params, req.max_len)

    def address(self) -> str:
        return self.addr

    def start_trace(self, origin_ns: int) -> None:
        from .. import trace

        trace.start(origin_ns)

    def stop_trace(self) -> list[dict]:
        from .. import trace

        return trace.stop()

    def info(self) -> dict:
        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "placement": self.placement, "sessions": len(self.server.servicer.sessions),
                "address": self.addr}


@ray.remote
class TargetWorker(DraftHost):
    def __init__(self, deploy: dict, rank: int = 0, world: int = 1, master: str | None = None):
        import torch

        self.deploy = DeploymentConfig.from_dict(deploy)
        t = self.deploy.target
        cores = [c + rank * len(t.cpu_affinity) for c in t.cpu_affinity] if t.cpu_affinity else None
        self.placement = pin(cores, t.threads)
        lm = _load(self.deploy)
        self.model, self.tokenizer = lm.model, lm.tokenizer
        if t.device == "cuda":
            self.model = self.model.to("cuda").prepare()
        self.backend = t.resolve_backend(self.deploy.dtype)
        if self.backend == "onnx":
            from ..models.ort_target import OrtTarget

            spec = self.deploy.speculative
            splits = [spec.resolve_exit_layer(self.model.cfg.n_layers)] if spec.method == "mirror" else []
            try:
                self.model = OrtTarget(self.model, splits=splits, threads=t.threads, prefill_cores=t.prefill_cores,
                                        prefill_attention=t.prefill_attention)
                torch.set_num_threads(1)  # host-side ops only: ONNX Runtime's pool has the cores (host_threads)
            except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own error types
                if t.backend != "auto":
                    raise
                log.warning("the onnx target backend failed (%s); the target runs on eager PyTorch", e)
                self.backend = "torch"
        self.rank, self.world, self.master = rank, world, master
        self.driver = self.model
        self.colocated = self.deploy.draft.colocate
        if self.colocated:  # the draft in this process: the target's cores and ONNX Runtime pool
            self._init_drafts(self.model, self.backend)
        self._cancel: dict[str, threading.Event] = {}
        self._active = 0
        self._run_lock = threading.Lock()
        torch.set_grad_enabled(False)

    def setup_tp(self) -> bool:
        """All ranks call this together: join the process group and shard the model; rank 0
        then drives, the others follow its calls in a background thread."""
        if self.world == 1:
            return True
        import torch.distributed as dist

        from .tensor_parallel import TPDriver, follow, shard_model

        addr, port = self.master.rsplit(":", 1)
        t = self.deploy.target
        backend = t.tp_backend if t.tp_backend != "auto" else ("nccl" if t.device == "cuda" else "gloo")
        dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=self.rank,
                                world_size=self.world)
        shard_model(self.model, self.rank, self.world)
        if self.rank == 0:
            self.driver = TPDriver(self.model)
        else:
            threading.Thread(target=follow, args=(self.model,), daemon=True, name="tp-follow").start()
        return True

    def info(self) -> dict:
        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "rank": self.rank,
                "placement": self.placement, "sessions": self._active, "backend": self.backend,
                "prefill_threads": getattr(self.model, "prefill_threads", None),
                "prefill_attention": getattr(self.model, "prefill_attention", None)
                if getattr(self.model, "wide_prefill", False) else None}

    def start_trace(self, origin_ns: int) -> None:
        from .. import trace

        trace.start(origin_ns)

    def stop_trace(self) -> list[dict]:
        from .. import trace

        return trace.stop()

    def cancel(self, request_id: str) -> bool:
        ev = self._cancel.get(request_id)
        if ev is not None:
            ev.set()
        return ev is not None

    def generate(self, prompt_ids: list[int], params: dict, spec: dict, request_id: str,
                 draft_address: str | None):
        """A Ray streaming generator of chunk dicts; the last one has finish_reason and usage."""
        import queue

        params = SamplingParams(**params)
        spec = SpecConfig.from_dict(spec)
        stop = threading.Event()
        self._cancel[request_id] = stop
        out: queue.SimpleQueue = queue.SimpleQueue()
        th = threading.Thread(target=self._run, args=(prompt_ids, params, spec, draft_address, stop, out),
                              daemon=True, name=f"request-{request_id[:8]}")
        th.start()
        try:
            while True:
                item = out.get()
                yield item
                if "finish_reason" in item:
                    break
        finally:
            stop.set()  # the consumer went away: stop decoding
            th.join()
            self._cancel.pop(request_id, None)

    def _run(self, prompt_ids, params, spec, draft_address, stop, out) -> None:
        import torch

        from ..decoding.ar import generate_ar
        from ..decoding.factory import draft_max_len
        from ..decoding.speculative import generate_speculative
        from ..decoding.target import TargetPipeline

        on_chunk = lambda text, ids: out.put({"text": text, "token_ids": list(ids)})  # noqa: E731
        with self._run_lock:  # one request at a time on this model and its caches
            self._active += 1
            draft = None
            try:
                if spec.method == "ar":
                    res = generate_ar(self.driver, self.tokenizer, prompt_ids, params, on_chunk, should_stop=stop.is_set)
                else:
                    draft = self._draft_pipeline(spec, params, draft_max_len(len(prompt_ids), params, spec)) \
                        if self.colocated else DegradingDraftPipeline(lambda: self._connect(draft_address), spec, params,
                                                                      prompt_kv=self._ships_prompt_kv(spec, prompt_ids))
                    exit_head = self._exit_head(spec)
                    target = TargetPipeline(self.driver, params, spec, exit_head=exit_head)
                    with torch.inference_mode():  # as the draft worker's channel runs its drafter
                        res = generate_speculative(target, draft, self.tokenizer, prompt_ids, params, spec,
                                                   on_chunk, should_stop=stop.is_set)
                m = res.metrics
                out.put({"finish_reason": res.finish_reason, "method": res.method,
                         "degraded": draft.degraded if draft is not None else None,
                         "usage": {"prompt_tokens": m.prompt_tokens, "completion_tokens": m.new_tokens,
                                   "tau": m.tau, "acceptance_rate": m.acceptance_rate, "hit_rate": m.hit_rate,
                                   "prefill_ms": m.prefill_s * 1e3, "decode_ms": m.decode_s * 1e3,
                                   "tokens_per_s": m.tokens_per_s},
                         "metrics": m.to_dict(), "ids": res.ids})
            except Exception as e:  # a failed request must not take the worker down
                log.exception("request failed")
                out.put({"finish_reason": "error", "error": f"{type(e).__name__}: {e}", "method": spec.method})
            finally:
                if draft is not None:
                    draft.release()
                if self.world > 1:
                    self.driver.release()
                self._active -= 1

    def _ships_prompt_kv(self, spec: SpecConfig, prompt_ids: list[int]) -> bool:
        """Send the draft the prompt's K/V (Open.prompt_kv): where this target prefills on more
        cores than it decodes on (target.prefill_cores: one of them is the draft's, so the draft
        must not prefill meanwhile) and the draft would compute the same K/V."""
        from ..decoding.factory import prompt_kv_min

        least = prompt_kv_min(spec)
        return getattr(self.model, "wide_prefill", False) and self.world == 1 and least is not None \
            and len(prompt_ids) >= least

    def _connect(self, address: str | None):
        from .channel import DraftChannelClient

        if address is None:
            raise ConnectionError("no draft worker is available")
        return DraftChannelClient(address, reply_timeout=self.deploy.draft.deadline_ms / 1e3)

    def _exit_head(self, spec: SpecConfig):
        from ..decoding.factory import load_exit_head

        return load_exit_head(spec, self.model) if self.world == 1 else None
