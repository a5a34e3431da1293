"""Int8 drafts: a copy of a model whose linear layers run as dynamically quantized int8 GEMMs.

A draft only proposes tokens - the target verifies every one, so a draft's numerics need not
match anything. An int8 copy of the target itself is the natural draft for an NPU (NPUs run
int8 networks) and for a memory-bound CPU: its weights are a quarter of fp32's bytes, and it
agrees with the fp32 target far more often than any small draft can.

`QuantLinear` keeps the weight as int8 with one symmetric scale per output channel and runs
`torch.ops.quantized.linear_dynamic` (activations quantized per call, per tensor), the kernel
behind `torch.ao`'s dynamic quantization, through PyTorch's x86/fbgemm backend. The fp32 weight
is dropped, so a quantized copy costs ~1/4 of the fp32 model's memory for its linear layers.

Activations are the hard part: a few input channels of LLM layers carry values 10-100x the rest,
so one scale per token leaves the other channels a handful of levels (on SmolLM2-135M the naive
int8 copy agrees with the fp32 target on 57% of greedy tokens; the FFN down projection alone
costs 37 points). `smoothed_copy` applies SmoothQuant (Xiao et al., 2023): per input channel,
divide the activation by s_j = max|X_j|^alpha / max|W_j|^(1-alpha) and multiply the weight's
column by it - exact in fp32, folded into the preceding RMSNorm weight (q/k/v, gate/up, LM head)
or into the up projection's rows (down projection), so it costs nothing at run time. The
activation maxima come from `calibrate_act_max` over training prompts (`mirror calibrate-int8`).
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from .ops import Linear

QUANT_MODES = ("int8",)


def int8_available() -> bool:
    return any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm", "onednn", "qnnpack"))


class QuantLinear(nn.Module):
    """y = x W^T + b with W int8 per output channel, activations quantized dynamically."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if not int8_available():
            raise RuntimeError("this PyTorch build has no quantized CPU engine (fbgemm/x86/onednn/qnnpack): "
                               "int8 drafts are unavailable; leave draft_quant unset")
        w = weight.detach().float().cpu()
        self.out_features, self.in_features = w.shape
        scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()
        with warnings.catch_warnings():  # quantized-tensor constructors warn about their future
            warnings.simplefilter("ignore")
            qw = torch.quantize_per_channel(w, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
            b = None if bias is None else bias.detach().float().cpu()
            self._packed = torch.ops.quantized.linear_prepack(qw, b)
        self.dtype = weight.dtype

    @classmethod
    def from_linear(cls, lin: nn.Module) -> "QuantLinear":
        return cls(lin.weight, getattr(lin, "bias", None))

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The dequantized fp32 weight (exactly the int8 values times their scales) and the bias."""
        qw, b = torch.ops.quantized.linear_unpack(self._packed)
        return qw.dequantize(), b

    def rows(self, ids: torch.Tensor) -> "QuantLinear":
        """A QuantLinear of output rows `ids` only (VocabTrim on an int8 LM head). Re-quantizing the
        dequantized rows gives back the same int8 values and scales (a row's largest |value| is
        127 of its scale), so its outputs equal this layer's outputs at `ids` exactly."""
        w, b = self.dequantized()
        return QuantLinear(w[ids], None if b is None else b[ids])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.dtype != torch.float32:
            x2 = x2.float()
        # reduce_range: 7-bit activations, as torch.ao's x86/fbgemm dynamic config (no overflow in
        # the u8 x s8 -> s16 multiply-add of AVX2/AVX-512)
        y = torch.ops.quantized.linear_dynamic(x2.contiguous(), self._packed, True)
        if y.dtype != self.dtype:
            y = y.to(self.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantized_copy(model: nn.Module, mode: str = "int8") -> nn.Module:
    """A copy of `model` whose linear layers are int8 QuantLinears; everything else (embedding,
    norms, RoPE tables) is shared with `model`, which is left untouched."""
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown draft quantization {mode!r}; choose one of {', '.join(QUANT_MODES)}")

    def clone(m: nn.Module) -> nn.Module:
        if isinstance(m, (Linear, nn.Linear)):
            return QuantLinear.from_linear(m)
        c = _shallow_copy(m)
        c._modules = {k: (None if v is None else clone(v)) for k, v in m._modules.items()}
        return c

    return clone(model)


# --- SmoothQuant ---------------------------------------------------------------------------------
DEFAULT_ALPHA = 0.85  # agreement with the target on held-out training answers: 0.74 at 0.5, 0.86 at 0.85


def calibrate_act_max(model: nn.Module, sequences, progress: bool = True) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| entering every Linear of a Transformer over `sequences` (token
    id lists), keyed by the Linear's module name. Runs the fp32 model; no gradients."""
    from ..decoding.drafters.network import DraftNet

    stats: dict[str, torch.Tensor] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (Linear, nn.Linear)):
            def hook(mod, inp, out, name=name):
                x = inp[0].detach()
                x = x.reshape(-1, x.shape[-1]).abs().amax(0).float()
                stats[name] = torch.maximum(stats[name], x) if name in stats else x
            hooks.append(m.register_forward_hook(hook))
    net = DraftNet.from_model(model)
    it = sequences
    if progress:
        from tqdm import tqdm

        it = tqdm(sequences, desc="int8 calibration", unit="seq")
    try:
        with torch.inference_mode():
            for ids in it:
                cache = net.new_cache(1, len(ids))
                net(torch.tensor([ids]), torch.arange(len(ids))[None], cache)
    finally:
        for h in hooks:
            h.remove()
    return stats


def _smooth(act: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    wmax = w.detach().abs().amax(0).float().clamp_min(1e-5)
    return (act.clamp_min(1e-5) ** alpha / wmax ** (1 - alpha)).clamp_min(1e-5)


def _norm_copy(norm: nn.Module, s: torch.Tensor) -> nn.Module:
    c = copy.copy(norm)
    c._parameters = dict(norm._parameters)
    c.weight = nn.Parameter((norm.weight.detach().float() / s).to(norm.weight.dtype), requires_grad=False)
    return c


def smoothed_copy(model: nn.Module, act_max: dict[str, torch.Tensor] | None, alpha: float = DEFAULT_ALPHA,
                  mode: str = "int8") -> nn.Module:
    """An int8 copy of a Transformer (`mirror.models.llama`), SmoothQuant-smoothed with
    `act_max` from calibrate_act_max (None: plain per-channel int8, no smoothing). The target
    is left untouched; embedding and RoPE tables are shared with it."""
    return quantized_copy(model if act_max is None else smoothed_model(model, act_max, alpha), mode)


def smoothed_model(model: nn.Module, act_max: dict[str, torch.Tensor], alpha: float = DEFAULT_ALPHA) -> nn.Module:
    """The SmoothQuant-smoothed fp32 copy of a Transformer: the same function (exact up to fp32
    rounding), with activation outliers moved into the weights - what `smoothed_copy` quantizes,
    and what the ONNX export of an int8 draft quantizes (onnx/export.py, quantize_graphs). The q/k/v,
    gate/up and LM head inputs are divided by s through the preceding RMSNorm's weight, the down
    projection's through the up projection's rows; wo is left as it is (GQA ties its input
    channels to v's). New Linears hold the smoothed weights; the rest is shared with `model`."""
    missing = [f"layers.{i}.{n}" for i in range(len(model.layers)) for n in ("wqkv", "w13", "w2")
               if f"layers.{i}.{n}" not in act_max] + ([] if "lm_head" in act_max else ["lm_head"])
    if missing:
        raise ValueError(f"int8 calibration does not match this model (no statistics for {missing[0]}"
                         f"{' and %d more' % (len(missing) - 1) if len(missing) > 1 else ''})")

    def linear(w: torch.Tensor, like: nn.Module) -> Linear:
        lin = Linear(w.shape[1], w.shape[0], bias=getattr(like, "bias", None) is not None, dtype=like.weight.dtype)
        lin.weight = nn.Parameter(w.to(like.weight.dtype), requires_grad=False)
        if lin.bias is not None:
            lin.bias = nn.Parameter(like.bias.detach().clone(), requires_grad=False)
        return lin

    q = _shallow_copy(model)
    q.layers = nn.ModuleList()
    for i, bt in enumerate(model.layers):
        if act_max[f"layers.{i}.wqkv"].numel() != bt.wqkv.in_features:
            raise ValueError(f"int8 calibration does not match this model (layer {i} width)")
        b = _shallow_copy(bt)
        w = bt.wqkv.weight.detach().float()
        s = _smooth(act_max[f"layers.{i}.wqkv"], w, alpha)
        b.attn_norm = _norm_copy(bt.attn_norm, s)
        b.wqkv = linear(w * s, bt.wqkv)
        w13 = bt.w13.weight.detach().float()
        s = _smooth(act_max[f"layers.{i}.w13"], w13, alpha)
        b.ffn_norm = _norm_copy(bt.ffn_norm, s)
        w13 = w13 * s
        w2 = bt.w2.weight.detach().float()
        s2 = _smooth(act_max[f"layers.{i}.w2"], w2, alpha)
        f = w2.shape[1]
        b.w13 = linear(torch.cat([w13[:f], w13[f:] / s2[:, None]]), bt.w13)  # silu(gate) * (up / s2): exact
        b.w2 = linear(w2 * s2, bt.w2)
        q.layers.append(b)
    w = model.lm_head.weight.detach().float()
    s = _smooth(act_max["lm_head"], w, alpha)
    q.norm = _norm_copy(model.norm, s)
    q.lm_head = linear(w * s, model.lm_head)
    return q


def _shallow_copy(m: nn.Module) -> nn.Module:
    """A module sharing `m`'s parameters, buffers and submodules, whose own entries can be replaced."""
    c = copy.copy(m)
    c._parameters, c._buffers, c._modules = dict(m._parameters), dict(m._buffers), dict(m._modules)
    return c


def save_calibration(path: str, act_max: dict[str, torch.Tensor], meta: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in act_max.items()}, path,
              metadata={k: str(v) for k, v in meta.items()})


def load_calibration(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    import os

    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"int8 calibration file not found: {path} (make one with `mirror calibrate-int8`)")
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata() or {})
        return {k: f.get_tensor(k) for k in f.keys()}, meta
