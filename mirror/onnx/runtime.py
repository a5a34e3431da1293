"""`OrtDraftNet`: an exported draft (export.py) run by ONNX Runtime, as a drop-in `DraftNet`.

`NetworkDrafter` / `StreamingDrafter` drive it through the same methods: `forward` (serial
steps and prefill chunks), `forward_branch` (Mirror-SD hypothesis rows), `forward_streams`,
`new_cache`, `new_branch_buffer`, `to_full`, `full_probs`, `vocab`, `keep_ids`, `streams`.

KV stays on the runtime side of the host: the caches are ordinary `KVCache` / branch buffers
(torch tensors on the CPU) that each call binds to the session by pointer (IO binding, no copy
on CPU-memory providers); a graph returns only the new K/V entries, which are written at their
positions here - a few KB per token instead of the whole static cache. Outputs are bound once
to preallocated host arrays. Static shapes mean:
  * step calls run a fixed width (1 or T tokens): longer inputs are chunked, shorter padded;
  * branch calls run R rows: fewer rows are padded with inert rows;
  * the cache holds exactly the exported max_len positions.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from ..decoding.drafters.network import DraftNet
from ..models.kv_cache import KVCache
from .export import config_fingerprint, read_metadata
from .providers import create_session, parse_providers

_NP = {"float32": np.float32, "int64": np.int64}


class _Graph:
    """One session with its IO binding: inputs bound per call by pointer, outputs bound once."""

    def __init__(self, path: str, sig: dict, requests, strict: bool, intra: int, inter: int,
                 quantized: bool = False):
        # CPU weight prepacking copies every matrix per session (~2x the weights each); it pays
        # for multi-row GEMMs (branch rows: 30 vs 46 ms at R=8) but not for the fp32 1-token GEMV,
        # which then runs straight from the memory-mapped weights.bin shared by all sessions.
        # Int8 graphs (MatMulInteger) need it for one token too: 22 vs 35 ms per bundled-model step.
        gemv = int(np.prod(sig["inputs"]["tokens"]["shape"])) == 1 and not quantized
        self.sess, self.status = create_session(path, requests, strict=strict, intra_threads=intra,
                                                inter_threads=inter,
                                                config={"session.disable_prepacking": "1"} if gemv else None)
        self.inputs = {n: tuple(v["shape"]) for n, v in sig["inputs"].items()}
        self.binding = self.sess.io_binding()
        self.out: dict[str, torch.Tensor] = {}
        for name, v in sig["outputs"].items():
            arr = np.zeros(v["shape"], dtype=_NP[v["dtype"]])
            self.binding.bind_output(name, "cpu", 0, arr.dtype, arr.shape, arr.ctypes.data)
            self.out[name] = torch.from_numpy(arr)  # shares memory with what ORT writes

    def run(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inputs are contiguous CPU tensors of exactly the exported shapes. Rebinding each call
        is a pointer update on CPU memory, and copies when a provider needs device memory
        (ONNX Runtime copies bound inputs at bind time, so a once-bound input would go stale)."""
        for name, x in inputs.items():
            if tuple(x.shape) != self.inputs[name]:
                raise ValueError(f"input {name}: shape {tuple(x.shape)}, graph wants {self.inputs[name]}")
            if not x.is_contiguous() or x.device.type != "cpu":
                raise ValueError(f"input {name} must be a contiguous CPU tensor")
            self.binding.bind_input(name, "cpu", 0, np.float32 if x.dtype == torch.float32 else np.int64,
                                    tuple(x.shape), x.data_ptr())
        self.sess.run_with_iobinding(self.binding)
        return self.out


class GroupedBranchBuffer:
    """Own-token KV of hypothesis rows, `[groups, n_layers, R, n_kv_heads, slots, head_dim]`:
    the R rows one branch-graph call sees are one contiguous block, bound without a copy.
    Same contract as `BranchBuffer` (rows 0..max_rows-1, `install`)."""

    def __init__(self, n_layers: int, rows_per_group: int, max_rows: int, n_kv_heads: int, slots: int,
                 head_dim: int):
        groups = -(-max_rows // rows_per_group)
        self.k = torch.zeros(groups, n_layers, rows_per_group, n_kv_heads, slots, head_dim)
        self.v = torch.zeros_like(self.k)
        self.R, self.max_rows, self.max_slots = rows_per_group, max_rows, slots

    def install(self, row: int, cache: KVCache, main_row: int, start: int, n_slots: int) -> None:
        """Copy branch `row`'s first n_slots own entries into the main cache at positions start.."""
        g, r = divmod(row, self.R)
        cache.k[:, main_row, :, start:start + n_slots] = self.k[g, :, r, :, :n_slots]
        cache.v[:, main_row, :, start:start + n_slots] = self.v[g, :, r, :, :n_slots]


def _layers(k: torch.Tensor, v: torch.Tensor, names=("k_cache", "v_cache")) -> dict[str, torch.Tensor]:
    """[L, ...] host buffers -> the graphs' per-layer inputs (contiguous views, no copy)."""
    return {**{f"{names[0]}_{i}": k[i] for i in range(k.shape[0])},
            **{f"{names[1]}_{i}": v[i] for i in range(v.shape[0])}}


def plan_chunks(n: int, widths: list[int], call_cost: float | dict[int, float]) -> list[int]:
    """Step widths covering n tokens at the least cost. `call_cost`: the cost of one call of
    each width (a dict, e.g. measured seconds), or a number c for the model "c tokens of work
    plus the width" (padding included). A call reads every weight once, so its fixed cost can
    dwarf a token's: then a few tokens go into one padded wide call rather than several narrow ones."""
    cost = call_cost if isinstance(call_cost, dict) else {w: call_cost + w for w in widths}
    best = [0.0] + [float("inf")] * n
    pick = [0] * (n + 1)
    for r in range(1, n + 1):
        for w in widths:
            c = cost[w] + best[max(0, r - w)]
            if c < best[r]:
                best[r], pick[r] = c, w
    out, r = [], n
    while r > 0:
        out.append(pick[r])
        r = max(0, r - pick[r])
    return out[::-1]


class OrtDraftNet:
    """A DraftNet run by ONNX Runtime from an export folder.

    providers: priority list (see providers.py; default CPU); strict: raise instead of falling
    back; intra_threads / inter_threads: per session (default 1, a pinned draft core);
    target_cfg: when given, the export must have been made for this target config.
    `status` reports the providers asked for and the ones running each graph.
    call_cost: how feeds are split into step calls (see plan_chunks); None = time one call of
    each step width on this provider at load (a few calls; what a wide padded call costs
    against narrow ones differs by hardware: on a CPU a 64-wide call costs ~7 one-token calls,
    so a 7-token window goes into the window-sized graph, not the prefill chunk)."""

    def __init__(self, model_dir: str, providers=None, *, strict: bool = False, intra_threads: int = 1,
                 inter_threads: int = 1, target_cfg=None, call_cost: float | dict | None = None):
        meta = read_metadata(model_dir)
        if target_cfg is not None and meta["target"] != config_fingerprint(target_cfg):
            raise ValueError(f"{model_dir} was exported for target {meta['target']}, "
                             f"not {config_fingerprint(target_cfg)}: export it again for this model")
        self.meta, self.dir = meta, str(model_dir)
        sh = meta["shapes"]
        self.L, self.R, self.W = meta["draft"]["cache_layers"], sh["rows"], sh["branch_slots"]
        self.max_len, self.widths = sh["max_len"], list(sh["step_widths"])
        self.n_kv, self.hd = sh["n_kv_heads"], sh["head_dim"]
        self.dtype = torch.float32
        self.batch_invariant = False
        self.call_cost = call_cost
        vt = meta.get("vocab_trim")
        if vt:
            from ..decoding.drafters.vocab_trim import VocabTrim

            self.keep_ids = VocabTrim.load(str(Path(model_dir) / vt["file"])).keep_ids
        else:
            self.keep_ids = None
        st = meta["draft"].get("streams")
        self.streams = SimpleNamespace(**st) if st else None
        self.requests = parse_providers(providers)
        self.graphs: dict[str, _Graph] = {}
        for name, g in meta["graphs"].items():
            self.graphs[name] = _Graph(str(Path(model_dir) / g["file"]), g, self.requests, strict,
                                       intra_threads, inter_threads, quantized=bool(meta.get("quant")))
        first = next(iter(self.graphs.values())).status
        self.status = {
            "requested": [r.to_dict() for r in self.requests],
            "available": first["available"],
            "provider": first["provider"],
            "fallback": any(g.status["fallback"] for g in self.graphs.values()),
            "cpu_fallback": any(g.status["cpu_fallback"] for g in self.graphs.values()),
            "strict": strict,
            "graphs": {n: g.status["active"] for n, g in self.graphs.items()},
            "io_binding": True,  # caches bound by pointer in host memory (no copy on CPU-memory providers)
            "threads": {"intra_op": intra_threads, "inter_op": inter_threads},
        }
        self._step = {w: self.graphs[f"step_t{w}"] for w in self.widths}
        self._branch = self.graphs[f"branch_r{self.R}"]
        self._stream = next((g for n, g in self.graphs.items() if n.startswith("stream_")), None)
        self._lock = threading.Lock()  # output buffers are per net: one call at a time
        if self.call_cost is None:
            self.call_cost = self._time_steps()
        self.status["step_call_ms"] = ({str(w): round(1e3 * c, 2) for w, c in self.call_cost.items()}
                                       if isinstance(self.call_cost, dict) else None)

    def _time_steps(self, reps: int = 3) -> dict[int, float]:
        """Seconds per call of each step width (median of `reps`, after one warm-up call)."""
        cache = KVCache(self.L, 1, self.n_kv, self.max_len, self.hd, layers=range(self.L))
        out = {}
        for w, g in self._step.items():
            args = dict(tokens=torch.zeros(1, w, dtype=torch.long), pos0=torch.tensor([0]),
                        last=torch.tensor([0]), **_layers(cache.k, cache.v))
            ts = []
            for _ in range(reps + 1):
                t = time.perf_counter()
                g.run(**args)
                ts.append(time.perf_counter() - t)
            out[w] = sorted(ts[1:])[reps // 2]
        return out

    # --- the DraftNet surface ---------------------------------------------------------------
    @property
    def vocab(self) -> int:
        return self.meta["shapes"]["vocab"]

    to_full = DraftNet.to_full  # plain functions of keep_ids: shared, not copied
    full_probs = DraftNet.full_probs

    def new_cache(self, max_batch: int, max_len: int) -> KVCache:
        if max_batch != 1:
            raise ValueError(f"the exported step graph drives one cache row, not {max_batch}")
        if max_len > self.max_len:
            raise ValueError(f"this draft needs {max_len} cache positions; the export in {self.dir} holds "
                             f"{self.max_len}: export again with --max-len >= {max_len} (an export made on first use: "
                             f"onnx_max_len, in a deployment draft.onnx_max_len / --onnx-max-len)")
        return KVCache(self.L, 1, self.n_kv, self.max_len, self.hd, layers=range(self.L))

    def new_branch_buffer(self, cache: KVCache, max_rows: int, max_slots: int) -> GroupedBranchBuffer:
        if max_slots > self.W:
            raise ValueError(f"branch rows need {max_slots} slots (gamma + 2); the export holds {self.W}: "
                             f"export again with --branch-slots >= {max_slots}")
        return GroupedBranchBuffer(self.L, self.R, max_rows, self.n_kv, self.W, self.hd)

    def __call__(self, tokens, positions, cache, rows=None, kv_len=None, last_only=False):
        return self.forward(tokens, positions, cache, rows, kv_len, last_only)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, rows=None,
                kv_len: int | None = None, last_only: bool = False) -> torch.Tensor:
        """tokens [1, n] at consecutive positions p0..p0+n-1 -> logits [1, 1, V'] (last_only or
        n == 1) or [1, n, V']. Writes the tokens' KV into cache row 0. kv_len is implied by the
        positions (keys after a query's position are masked either way)."""
        if tokens.shape[0] != 1 or (rows is not None and list(rows) != [0]):
            raise ValueError("OrtDraftNet runs cache row 0 only (one request per drafter)")
        n = tokens.shape[1]
        p0 = int(positions[0, 0])
        if p0 + n > self.max_len:
            raise ValueError(f"position {p0 + n - 1} is past the exported max_len {self.max_len}")
        with self._lock:
            if last_only or n == 1:
                return self._feed(tokens[0], p0, cache)[None]
            return torch.cat([self._feed(tokens[0, i:i + 1], p0 + i, cache) for i in range(n)])[None]

    def _feed(self, toks: torch.Tensor, p0: int, cache: KVCache) -> torch.Tensor:
        """Run toks (1-D) at p0.. through padded fixed-width steps -> last logits [1, V']."""
        i = 0
        for w in plan_chunks(len(toks), self.widths, self.call_cost):
            m = min(w, len(toks) - i)
            t = torch.zeros(1, w, dtype=torch.long)
            t[0, :m] = toks[i:i + m]
            out = self._step[w].run(tokens=t, pos0=torch.tensor([p0 + i]), last=torch.tensor([m - 1]),
                                    **_layers(cache.k, cache.v))
            cache.k[:, 0, :, p0 + i:p0 + i + m] = out["k_new"][:, 0, :, :m]
            cache.v[:, 0, :, p0 + i:p0 + i + m] = out["v_new"][:, 0, :, :m]
            i += m
        return out["logits"].clone()

    def forward_branch(self, tokens, positions, cache, main_row, prefix, buf, s_main, row0: int = 0):
        """Hypothesis rows row0.. of `buf` over the shared prefix of cache row 0 -> [n, V']
        (see BranchContext). s_main is implied by prefix."""
        if main_row != 0:
            raise ValueError("OrtDraftNet branches off cache row 0")
        if not isinstance(buf, GroupedBranchBuffer):
            raise TypeError("branch buffers for OrtDraftNet come from its new_branch_buffer()")
        n = tokens.shape[0]
        pos = positions[:, -1]
        slots = pos - prefix
        if int(slots.max()) >= self.W or int(slots.min()) < 0:
            raise ValueError(f"branch slot outside [0, {self.W})")
        out_logits = []
        with self._lock:
            r = 0
            while r < n:
                g, j0 = divmod(row0 + r, self.R)
                m = min(self.R - j0, n - r)  # rows of this call within group g
                tk = torch.zeros(self.R, 1, dtype=torch.long)
                ps = torch.zeros(self.R, dtype=torch.long)  # padding rows: position 0, prefix 0 -
                pf = torch.zeros(self.R, dtype=torch.long)  # they attend to their slot 0 only
                tk[j0:j0 + m, 0] = tokens[r:r + m, -1]
                ps[j0:j0 + m] = pos[r:r + m]
                pf[j0:j0 + m] = prefix[r:r + m]
                out = self._branch.run(tokens=tk, positions=ps, prefix=pf, **_layers(cache.k, cache.v),
                                       **_layers(buf.k[g], buf.v[g], ("k_own", "v_own")))
                idx = torch.arange(j0, j0 + m)
                s = slots[r:r + m]
                buf.k[g][:, idx, :, s] = out["k_new"][:, idx].transpose(0, 1)  # -> [m, L, Hk, hd]
                buf.v[g][:, idx, :, s] = out["v_new"][:, idx].transpose(0, 1)
                out_logits.append(out["logits"][j0:j0 + m].clone())
                r += m
        return torch.cat(out_logits)

    def forward_streams(self, tokens, positions, cache, kv_len: int):
        """Speculative streaming pass (see forward_with_streams) -> (main [T, V'], streams [gs, V'])."""
        if self._stream is None:
            raise ValueError(f"the export in {self.dir} has no speculative-streaming graph")
        n = tokens.shape[1]
        T = self._stream.inputs["tokens"][1]
        if n > T:
            raise ValueError(f"a streaming pass feeds at most {T} tokens, got {n}")
        p0 = int(positions[0, 0])
        if p0 + n + self.streams.n_streams > self.max_len:
            raise ValueError(f"position {p0 + n + self.streams.n_streams - 1} is past the exported max_len")
        t = torch.zeros(1, T, dtype=torch.long)
        t[0, :n] = tokens[0]
        with self._lock:
            out = self._stream.run(tokens=t, pos0=torch.tensor([p0]), n_valid=torch.tensor([n]),
                                   **_layers(cache.k, cache.v))
            cache.k[:, 0, :, p0:p0 + n] = out["k_new"][:, 0, :, :n]
            cache.v[:, 0, :, p0:p0 + n] = out["v_new"][:, 0, :, :n]
            return out["logits"][:n].clone(), out["stream_logits"].clone()


_NETS: dict[tuple, OrtDraftNet] = {}


def ort_draft_for_spec(target, spec, kind: str) -> OrtDraftNet:
    """The OrtDraftNet a SpecConfig asks for (draft_backend="onnx"): spec.onnx_dir, checked
    against the draft the spec describes, or an export made on first use (export.cached_export).
    Sessions are kept per folder and settings, so repeated requests do not reload the graphs."""
    import json

    from .export import cached_export, check_net, torch_draft_net

    if spec.draft_quant == "gguf" and kind == "model" and not spec.onnx_dir and _cpu_only(spec.onnx_providers):
        return gguf_draft_for_spec(target, spec, kind)
    model_dir = spec.onnx_dir or cached_export(target, spec, kind)
    key = (str(Path(model_dir).resolve()), json.dumps(spec.onnx_providers, sort_keys=True), spec.onnx_strict,
           spec.onnx_threads, spec.onnx_inter_threads, id(target))
    net = _NETS.get(key)
    if net is None:
        net = OrtDraftNet(model_dir, spec.onnx_providers, strict=spec.onnx_strict, intra_threads=spec.onnx_threads,
                          inter_threads=spec.onnx_inter_threads, target_cfg=target.cfg)
    if spec.onnx_dir:  # a folder given by hand may hold another draft than the spec's
        check_net(net.meta, torch_draft_net(target, spec, kind), kind, spec, target)
    _NETS[key] = net
    return net


def _cpu_only(providers) -> bool:
    from .providers import CPU, parse_providers

    return all(r.name == CPU for r in parse_providers(providers))


def gguf_draft_for_spec(target, spec, kind: str = "model"):
    """draft_quant=gguf on the CPU provider: the GGUF file's blocks as one graph built here
    (gguf_net.GgufDraftNet: dynamic shapes, attention over the used positions only), kept per
    file, head trim and thread settings. An NPU provider, or a folder given as onnx_dir, takes
    the static-shape export instead (`mirror export-draft --draft-quant gguf`)."""
    import hashlib

    from ..decoding.factory import _separate_model, draft_keep_ids
    from .export import gguf_source
    from .gguf_net import GgufDraftNet

    path = gguf_source(spec, target)
    keep = draft_keep_ids(spec, kind)
    trim = hashlib.sha1(keep.numpy().tobytes()).hexdigest() if keep is not None else None
    key = ("gguf", path, trim, spec.onnx_threads, spec.onnx_inter_threads, spec.onnx_strict,
           id(target) if spec.draft_model == "target" else None)
    net = _NETS.get(key)
    if net is None:
        model = getattr(target, "model", target) if spec.draft_model == "target" \
            else _separate_model(spec.draft_model, target)
        net = GgufDraftNet(model, keep, spec.onnx_providers, strict=spec.onnx_strict,
                           intra_threads=spec.onnx_threads, inter_threads=spec.onnx_inter_threads)
        _NETS[key] = net
    if spec.draft_prefill != "draft" and net.can_prefill:  # built now, not on the first prompt
        # the in-process onnx target is the fp32 graph of this very model: shared, not built twice
        same = spec.draft_model == "target" and getattr(target, "backend", None) == "onnx"
        net.enable_prefill(target if same else None)
    return net
