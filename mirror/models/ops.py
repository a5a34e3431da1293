"""Batch-invariant building blocks.

Speculative decoding is lossless only if the target computes the same numbers for a token
whether it sees it alone (plain decoding, 1 row) or inside a verification window (gamma+1
rows). Stock CPU GEMMs do not promise that: MKL's sgemm picks different kernels (and
reduction orders) for M=1, M=2..15 and M>=16, so logits drift by ~1e-5 and greedy argmax
flips now and then. oneDNN's linear with a pre-packed weight uses one kernel for every M>=2
(checked up to 40 rows); we pack every weight once and pad a single row to two. Attention
matmuls get the same treatment in the model (a single query is padded to two), and
`tests/test_model.py` checks the property on whole forwards.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

_HAS_ONEDNN_LINEAR = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)
# oneDNN packs bf16 weights only on CPUs with native bf16 conversions (AVX512-BW/VL/DQ or
# AVX-NE-CONVERT); elsewhere (e.g. an AVX2-only EPYC) bf16 runs unpacked. None = not tried yet.
_BF16_PACKS: bool | None = None


def _reorder(w: torch.Tensor) -> torch.Tensor | None:
    global _BF16_PACKS
    if w.dtype == torch.bfloat16:
        if _BF16_PACKS is False:
            return None
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(w, 2)
        except RuntimeError as e:
            _BF16_PACKS = False
            log.warning("bf16 weights cannot be pre-packed for oneDNN on this CPU (%s): bf16 runs "
                        "unpacked, without the batch-invariance guarantee - use fp32 for bit-exact "
                        "speculative output", str(e).splitlines()[0])
            return None
        _BF16_PACKS = True
        return packed
    return torch.ops.mkldnn._reorder_linear_weight(w, 2)


class Linear(nn.Module):
    """y = x W^T + b with an optional pre-packed oneDNN weight for batch-invariant CPU inference."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None
        self._packed: torch.Tensor | None = None

    def pack(self) -> None:
        """Pre-pack the weight for oneDNN (CPU only). Call again after changing the weight."""
        w = self.weight.detach()
        if _HAS_ONEDNN_LINEAR and w.device.type == "cpu" and w.dtype in (torch.float32, torch.bfloat16):
            self._packed = _reorder(w)
        else:
            self._packed = None

    def unpack(self) -> None:
        self._packed = None

    def _apply(self, fn, recurse=True):  # .to()/.float() invalidate the packed copy
        self._packed = None
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed
        if packed is None or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return F.linear(x, self.weight, self.bias)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.dtype != self.weight.dtype:
            x2 = x2.to(self.weight.dtype)
        m = x2.shape[0]
        if m == 1:  # oneDNN's single-row kernel rounds differently from its M>=2 kernel
            x2 = x2.expand(2, -1)
        y = torch.ops.mkldnn._linear_pointwise(x2.contiguous(), packed,
                                               None if self.bias is None else self.bias.detach(),
                                               "none", [], "")
        if m == 1:
            y = y[:1]
        return y.reshape(*shape[:-1], self.out_features)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # one fused kernel, bit for bit the unfused formula below on fp32 (tests/test_model.py)
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def pack_linears(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, Linear):
            m.pack()
