"""Build drafters and run any method from a SpecConfig: the one entry point for `ar`, `sd`
and `mirror` used by the CLI, the benchmarks and the workers."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from ..models.llama import Transformer
from ..sampling import SamplingParams
from ..spec_config import SpecConfig
from ..tokenizer import Tokenizer
from .ar import generate_ar
from .drafters.base import Drafter
from .drafters.combined import CombinedDrafter
from .drafters.network import DraftNet, NetworkDrafter, make_adapter
from .drafters.ngram import NgramDrafter
from .drafters.vocab_trim import VocabTrim
from .result import GenerationResult
from .speculative import DraftPipeline, generate_speculative
from .target import TargetPipeline

log = logging.getLogger(__name__)
_DRAFT_MODELS: dict[tuple, Transformer] = {}


def load_draft_model(path: str, target: Transformer, quant: str = "none", int8_calib: str | None = None) -> Transformer:
    """A separate draft model: a GGUF / Hugging Face path, or "target" (the target's own weights);
    with quant="int8" an int8 copy, SmoothQuant-smoothed with the `int8_calib` statistics."""
    key = (path if path != "target" else ("target", id(target)), quant, int8_calib)
    if quant == "gguf":
        raise ValueError("draft_quant=gguf runs the GGUF file's own 4-bit blocks under ONNX Runtime "
                         "(MatMulNBits), not as a PyTorch model")
    if key not in _DRAFT_MODELS:
        if quant != "none":
            from ..models.quant import quantized_copy

            dm = quantized_copy(smoothed_draft_model(path, target, int8_calib), mode=quant)
        elif path == "target":
            raise ValueError("draft_model=target without draft_quant is the target itself: "
                             "set draft_quant=int8 for an int8 copy")
        else:
            dm = _separate_model(path, target)
        _DRAFT_MODELS[key] = dm
    return _DRAFT_MODELS[key]


def smoothed_draft_model(path: str, target: Transformer, int8_calib: str | None) -> Transformer:
    """The fp32 model an int8 draft quantizes: the draft model (or the target's weights), smoothed
    with the `int8_calib` SmoothQuant statistics (none: as it is). Not cached: quantize it."""
    dm = target if path == "target" else _separate_model(path, target)
    if not int8_calib:
        return dm
    from ..models.bundled import resolve_artifact
    from ..models.quant import DEFAULT_ALPHA, load_calibration, smoothed_model

    act, meta = load_calibration(resolve_artifact(int8_calib, "int8_calib"))
    return smoothed_model(dm, act, alpha=float(meta.get("alpha", DEFAULT_ALPHA)))


def _separate_model(path: str, target: Transformer) -> Transformer:
    from ..models.loader import load_model

    dm = load_model(path, dtype=target.dtype, tokenizer=False).model
    if dm.cfg.vocab_size != target.cfg.vocab_size:
        raise ValueError(f"draft model {path} has vocab {dm.cfg.vocab_size}, the target "
                         f"{target.cfg.vocab_size}: a draft must share the target's tokenizer")
    return dm


def distilled_trim(draft_model: str) -> str | None:
    """The VocabTrim set a `mirror distill-draft` model was trained behind (its draft.json)."""
    meta = os.path.join(draft_model, "draft.json")
    if not os.path.isfile(meta):
        return None
    import json

    with open(meta) as f:
        name = json.load(f).get("vocab_trim")
    return os.path.join(draft_model, name) if name else None


def draft_keep_ids(spec: SpecConfig, kind: str, art=None) -> torch.Tensor | None:
    """The VocabTrim token ids of a network draft's head (None: the full vocabulary): the spec's
    vocab_trim ('none': explicitly untrimmed), else the set its adapter or distilled draft model
    was trained behind."""
    trim_path = spec.vocab_trim
    if trim_path == "none":  # explicitly untrimmed, even if the artifact was trained with a trim
        trim_path = None
    elif trim_path is None and art is not None and art.meta.get("vocab_trim"):
        trim_path = os.path.join(os.path.dirname(spec.adapter), art.meta["vocab_trim"])  # trained with it
    elif trim_path is None and kind == "model" and spec.draft_model != "target":
        trim_path = distilled_trim(spec.draft_model)
    from ..models.bundled import resolve_artifact

    return VocabTrim.load(resolve_artifact(trim_path, "vocab_trim")).keep_ids if trim_path else None


def build_draft_net(target: Transformer, spec: SpecConfig, kind: str) -> DraftNet:
    """The network of a 'self', 'model' or 'streaming' draft, with its trained parts if given:
    a DraftNet, or with draft_backend="onnx" the same network exported and run by ONNX Runtime
    (an OrtDraftNet, which NetworkDrafter drives the same way). A draft_quant="gguf" model draft
    always goes to ONNX Runtime, whatever draft_backend says: PyTorch has no kernel for the GGUF
    file's blocks (`ort_draft_for_spec` picks the graph built for the CPU or the static export)."""
    from .artifacts import load_draft_artifact

    gguf = spec.draft_quant == "gguf" and kind == "model"
    if spec.draft_backend == "onnx" or gguf:
        import importlib.util

        if gguf and importlib.util.find_spec("onnxruntime") is None:
            raise ValueError("draft_quant=gguf runs the GGUF file's own 4-bit blocks under ONNX Runtime: "
                             "pip install 'mirror-sd[onnx]'")
        from ..onnx.runtime import ort_draft_for_spec

        return ort_draft_for_spec(target, spec, kind)

    art = load_draft_artifact(spec.adapter, target) if spec.adapter and kind != "model" else None
    keep = draft_keep_ids(spec, kind, art)
    if kind == "model":
        return DraftNet.from_model(load_draft_model(spec.draft_model, target, spec.draft_quant, spec.int8_calib),
                                   keep)
    k = art.layers if art is not None else spec.draft_layers
    adapter = art.adapter if art is not None else None
    net = DraftNet.self_draft(target, k, adapter, keep)
    if kind == "streaming":
        from .drafters.streaming import attach_streams

        attach_streams(net, art.streams if art is not None and art.streams is not None else None,
                       n_streams=spec.streams or 2, n_layers=spec.stream_layers)
    return net


def network_or_ngram(target: Transformer, spec: SpecConfig, kind: str):
    """(spec, net) for a draft's network. A combined n-gram + gguf draft (the embedded default)
    whose model has no quantized GGUF blocks - another model, an fp32 file - runs its n-gram
    part alone, with a warning: (spec with draft "ngram", None). Any other failure is an error."""
    try:
        return spec, build_draft_net(target, spec, kind)
    except ValueError as e:
        if "ngram" not in spec.draft.split("+") or spec.draft_quant != "gguf":
            raise
        log.warning("%s: the n-gram + gguf draft runs its n-gram part alone", e)
        return ngram_part(spec), None


def ngram_part(spec: SpecConfig) -> SpecConfig:
    """A combined draft's spec without its network (see network_or_ngram)."""
    import dataclasses

    return dataclasses.replace(spec, draft="ngram", draft_model=None, draft_quant="none", combine_min=0.0)


def draft_prefill(spec: SpecConfig, net) -> int | None:
    """The shortest prompt `net` prefills with its model's fp32 graph (SpecConfig.draft_prefill),
    or None: "fp32" every prompt, "auto" those of PREFILL_MIN tokens where it can (the built gguf
    graph, whose model's weights are fp32 on the CPU), "draft" none."""
    least = _fp32_prefill_min(spec)
    if least is None:
        return None
    ok = bool(getattr(net, "can_prefill", False))
    if spec.draft_prefill == "fp32" and not ok:
        raise ValueError("draft_prefill=fp32 needs a draft that holds its model's fp32 weights: the "
                         "draft_quant=gguf graph built for the CPU provider; this draft "
                         f"({type(net).__name__}) prefills with its own graph (draft_prefill=draft)")
    return least if ok else None


def _fp32_prefill_min(spec: SpecConfig) -> int | None:
    """SpecConfig.draft_prefill as a prompt length: "fp32" 1, "auto" PREFILL_MIN, "draft" None."""
    from .drafters.network import PREFILL_MIN

    return None if spec.draft_prefill == "draft" else 1 if spec.draft_prefill == "fp32" else PREFILL_MIN


def prompt_kv_min(spec: SpecConfig) -> int | None:
    """Behind the channel: the shortest prompt whose K/V the target sends the draft instead of
    the draft prefilling it (Open.prompt_kv), or None. Only where the draft would compute the
    target's own prompt K/V (up to float rounding: the target's prefill sessions may attend
    through a fused kernel) - its network part is the target's own GGUF blocks
    (draft_model=target, draft_quant=gguf), prefilling through the model's fp32 weights
    (`draft_prefill`: "fp32" every prompt, "auto" from PREFILL_MIN tokens). The draft checks
    again (Drafter.adopt_kv) and prefills itself when it cannot take them."""
    if "model" not in spec.draft.split("+") or spec.draft_model != "target" or spec.draft_quant != "gguf":
        return None
    return _fp32_prefill_min(spec)


def build_drafter(target: Transformer, spec: SpecConfig, params: SamplingParams, max_len: int,
                  net: DraftNet | None = None, target_backend: str | None = None) -> Drafter:
    """`target_backend`: the backend the target verifies on, for the window stop's cost curve
    (default: `target`'s own; a draft worker holding an eager copy passes the deployment's)."""
    kinds = spec.draft.split("+")
    ngram = None
    if "ngram" in kinds:
        from .drafters.ngram import load_datastore

        store = load_datastore(spec.ngram_datastore) if spec.ngram_datastore else None
        from .drafters.window_stop import load_window_stop

        backend = target_backend or getattr(target, "backend", "torch")
        stop = load_window_stop(spec.window_stop).for_backend(backend) if spec.window_stop else None
        # a combined draft's per-step choice scores n-gram windows with the stop's table (the
        # bundled one when no stop is set: scoring only, windows are not cut)
        score = (stop or load_window_stop("bundled")) if spec.combine_min > 0 else None
        ngram = NgramDrafter(params, spec.ngram_min, spec.ngram_max, datastore=store, stop=stop, score=score)
    net_kind = next((k for k in kinds if k != "ngram"), None)
    network = None
    if net_kind is not None and net is None:
        spec, net = network_or_ngram(target, spec, net_kind)
        if net is None:
            return ngram
    if net_kind is not None:
        prefill = draft_prefill(spec, net)
        if net_kind == "streaming":
            from .drafters.streaming import StreamingDrafter

            network = StreamingDrafter(net, params, target.cfg.vocab_size, max_len, spec.confidence,
                                       max_rows=spec.budget + spec.pre_budget, gamma_max=spec.gamma,
                                       own_k=spec.kappa if spec.pre_budget else 0, prefill=prefill,
                                       catch_up=spec.catch_up)
        else:
            network = NetworkDrafter(net, params, target.cfg.vocab_size, max_len, spec.confidence,
                                     max_rows=spec.budget + spec.pre_budget, gamma_max=spec.gamma,
                                     own_k=spec.kappa if spec.pre_budget else 0, prefill=prefill,
                                     catch_up=spec.catch_up)
            network.name = net_kind
    if ngram is not None and network is not None:
        return CombinedDrafter(params, ngram, network, min_expected=spec.combine_min)
    return ngram or network


def load_exit_head(spec: SpecConfig, target: Transformer):
    if not spec.exit_head:
        return None
    from .artifacts import load_exit_head as _load

    from ..models.bundled import resolve_artifact

    return _load(resolve_artifact(spec.exit_head, "exit_head"), target)


def draft_max_len(prompt_len: int, params: SamplingParams, spec: SpecConfig) -> int:
    """The longest context a request's drafter sees: prompt, every new token, a window past them."""
    return prompt_len + params.max_new_tokens + spec.gamma + 2


def generate(model: Transformer, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams,
             spec: SpecConfig | None = None, on_chunk: Callable[[str, list[int]], None] | None = None,
             should_stop: Callable[[], bool] | None = None, drafter: Drafter | None = None) -> GenerationResult:
    """Run `spec.method` on one prompt (ar when spec is None)."""
    spec = spec or SpecConfig(method="ar")
    if spec.method == "ar":
        return generate_ar(model, tokenizer, prompt_ids, params, on_chunk, should_stop=should_stop)
    drafter = drafter or build_drafter(model, spec, params, draft_max_len(len(prompt_ids), params, spec))
    target = TargetPipeline(model, params, spec, exit_head=load_exit_head(spec, model))
    with torch.inference_mode():
        res = generate_speculative(target, DraftPipeline(drafter, spec), tokenizer, prompt_ids, params,
                                   spec, on_chunk, should_stop)
    net = getattr(getattr(drafter, "net", None), "net", None) or getattr(drafter, "net", None)
    if hasattr(net, "status"):  # an ONNX Runtime draft: where it ran, fallback included
        res.metrics.extra["draft_backend"] = net.status
    return res
