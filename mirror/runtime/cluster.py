"""The distributed runtime: Ray placement of the target and draft workers, and an Engine the
gRPC server (and `mirror generate`) talk to.

    engine = DistributedEngine(DeploymentConfig.load("deploy/local.yaml"))   # starts/joins Ray
    async for chunk in engine.generate(engine.prepare(request), cancel_event): ...

Placement group: one bundle per target worker (GPU or CPU, plus the optional target resource)
and one for the draft (its custom accelerator resource, plus a GPU for a GPU draft);
STRICT_PACK keeps them on one host, SPREAD puts them on different nodes.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import uuid

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ..engine import Chunk, Engine, GenerateArgs, Usage
from .config import DeploymentConfig
from .workers import DraftWorker, TargetWorker

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def start_ray(deploy: DeploymentConfig) -> None:
    """Join the configured cluster, or start a local Ray in-process (the embedded default)."""
    if ray.is_initialized():
        return
    r = deploy.ray
    address = r.address or os.environ.get("RAY_ADDRESS")  # set for `ray job submit` entrypoints
    if address:
        ray.init(address=address, namespace=r.namespace, log_to_driver=False)
        return
    t, d = deploy.target, deploy.draft
    need = t.num_workers * t.num_cpus + (0 if d.colocate else d.num_cpus)
    resources = {**({} if d.colocate else {d.resource: d.resource_amount}), **r.resources}
    if t.resource:
        resources.setdefault(t.resource, float(t.num_workers))
    # address="local": always a fresh in-process Ray. Without it ray.init joins any Ray it finds
    # running on this machine (a `ray start`, a test cluster), and then refuses num_cpus.
    ray.init(address="local", num_cpus=r.num_cpus or max(int(need + 0.999), os.cpu_count() or 1),
             resources=resources, namespace=r.namespace, include_dashboard=r.include_dashboard, log_to_driver=False,
             configure_logging=False)


class Runtime:
    """Owns the placement group and the actors of one deployment."""

    def __init__(self, deploy: DeploymentConfig):
        self.deploy = deploy
        start_ray(deploy)
        t, d = deploy.target, deploy.draft
        tb = {"CPU": t.num_cpus}
        if t.num_gpus:
            tb["GPU"] = t.num_gpus
        if t.resource:
            tb[t.resource] = 1.0
        db = {"CPU": d.num_cpus, d.resource: d.resource_amount}
        if d.num_gpus:
            db["GPU"] = d.num_gpus
        self.pg = placement_group([dict(tb) for _ in range(t.num_workers)] + ([] if d.colocate else [db]),
                                  strategy=deploy.placement)
        ray.get(self.pg.ready(), timeout=120)
        cfg = deploy.to_dict()
        self.draft_bundle = t.num_workers
        self.draft = None if d.colocate else self._start_draft()  # colocated: inside the target worker
        master = None
        if t.num_workers > 1:
            ip = ray.util.get_node_ip_address()
            master = f"{ip}:{_free_port()}"
        self.targets = [
            TargetWorker.options(
                num_cpus=t.num_cpus, num_gpus=t.num_gpus, max_concurrency=8,
                resources={t.resource: 1.0} if t.resource else None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote(cfg, i, t.num_workers, master)
            for i in range(t.num_workers)]
        ray.get([w.setup_tp.remote() for w in self.targets], timeout=600)
        self.target = self.targets[0]
        if self.draft is None:
            return
        try:  # the first request should find its draft (later restarts are checked per request)
            ray.get(self.draft.address.remote(), timeout=120)
        except Exception as e:
            log.warning("the draft worker is not ready (%s); requests run target-only until it is", e)

    def _start_draft(self):
        d = self.deploy.draft
        return DraftWorker.options(
            num_cpus=d.num_cpus, num_gpus=d.num_gpus, resources={d.resource: d.resource_amount},
            max_restarts=-1 if d.restart else 0, max_task_retries=0, max_concurrency=4,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=self.draft_bundle),
        ).remote(self.deploy.to_dict())

    async def draft_address(self, timeout: float = 5.0) -> str | None:
        """The draft's channel address, or None while it is dead or restarting (Ray restarts it
        in the background; later requests pick it up again). None too when the draft is colocated:
        the target worker drafts itself."""
        if self.draft is None:
            return None
        try:
            return await asyncio.wait_for(self.draft.address.remote(), timeout)
        except Exception as e:
            log.warning("draft worker unavailable: %s", e)
            return None

    def start_trace(self) -> int:
        """Record spans in every worker from now on (one shared time origin); returns it."""
        import time

        origin = time.perf_counter_ns()
        ray.get([w.start_trace.remote(origin) for w in self._actors()])
        return origin

    def stop_trace(self, origin: int):
        """The workers' events merged into one Recorder (processes are lanes in the trace)."""
        from .. import trace

        events = [e for evs in ray.get([w.stop_trace.remote() for w in self._actors()]) for e in evs]
        return trace.merge(events, origin)

    def info(self) -> dict:
        return {"target": ray.get([w.info.remote() for w in self.targets]),
                "draft": ray.get(self.draft.info.remote(), timeout=30) if self.draft is not None else "colocated"}

    def _actors(self) -> list:
        return self.targets + ([self.draft] if self.draft is not None else [])

    def shutdown(self) -> None:
        for a in self._actors():
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass
        remove_placement_group(self.pg)


class DistributedEngine(Engine):
    """Engine over a Runtime: validation here, decoding in the workers."""

    def __init__(self, deploy: DeploymentConfig, runtime: Runtime | None = None):
        from ..models.loader import load_tokenizer

        self.deploy = deploy
        self.default_spec = deploy.speculative
        self.tokenizer, self.context_len = load_tokenizer(deploy.model)
        self.runtime = runtime or Runtime(deploy)
        self.completed: collections.deque[dict] = collections.deque(maxlen=64)  # final worker reports

    async def generate(self, args: GenerateArgs, cancel: asyncio.Event):
        rt = self.runtime
        rid = args.request_id or uuid.uuid4().hex
        spec = args.spec
        draft = await rt.draft_address() if spec.method != "ar" else None
        p = args.params
        params = {"max_new_tokens": p.max_new_tokens, "temperature": p.temperature, "top_k": p.top_k,
                  "top_p": p.top_p, "seed": p.seed, "stop": list(p.stop),
                  "stop_token_ids": list(p.stop_token_ids), "ignore_eos": p.ignore_eos}
        gen = rt.target.generate.options(num_returns="streaming").remote(
            args.prompt_ids, params, spec.to_dict(), rid, draft)
        watcher = asyncio.ensure_future(self._watch(cancel, rid))
        try:
            async for ref in gen:
                c = await ref
                if "finish_reason" in c:
                    self.completed.append(dict(c, request_id=rid))
                    u = c.get("usage")
                    yield Chunk(finish_reason=c["finish_reason"], usage=Usage(**u) if u else None,
                                error=c.get("error", ""), method=c.get("method", spec.method))
                else:
                    yield Chunk(c["text"], c["token_ids"])
        except Exception as e:  # the target worker died: end the stream, keep serving
            log.exception("request %s failed in the target worker", rid)
            yield Chunk(finish_reason="error", error=f"{type(e).__name__}: {e}", method=spec.method)
        finally:
            if not watcher.done():
                watcher.cancel()
            rt.target.cancel.remote(rid)  # no-op when finished; stops decoding if the client left

    async def _watch(self, cancel: asyncio.Event, rid: str) -> None:
        await cancel.wait()
        await self.runtime.target.cancel.remote(rid)

    async def close(self) -> None:
        self.runtime.shutdown()
