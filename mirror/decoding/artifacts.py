"""Trained draft artifacts: one safetensors file + JSON metadata, produced by `mirror train-draft`.

Tensors are stored under prefixes: `adapter.` (Kangaroo adapter block), `streams.` (speculative
streaming embeddings) and `exit_head.` (trained early-exit head). The metadata records the
shapes and the target it was trained for, so a mismatched artifact fails loudly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch import nn

from ..models.llama import Transformer


@dataclass
class DraftArtifact:
    layers: int
    adapter: nn.Module | None
    streams: nn.Module | None
    meta: dict


def target_fingerprint(target: Transformer) -> dict:
    c = target.cfg
    return {"arch": c.arch, "dim": c.dim, "n_layers": c.n_layers, "vocab_size": c.vocab_size}


def save_artifact(path: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, path,
              metadata={"mirror": json.dumps(meta)})


def read_artifact(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, "pt") as f:
        meta = json.loads((f.metadata() or {}).get("mirror", "{}"))
    return load_file(path), meta


def _check(meta: dict, target: Transformer, path: str) -> None:
    fp = meta.get("target")
    if fp and fp != target_fingerprint(target):
        raise ValueError(f"{path} was trained for target {fp}, not {target_fingerprint(target)}")


def load_draft_artifact(path: str, target: Transformer) -> DraftArtifact:
    from .drafters.network import make_adapter
    from .drafters.streaming import StreamEmbeddings

    tensors, meta = read_artifact(path)
    _check(meta, target, path)
    k = int(meta["layers"])
    adapter = None
    if meta.get("adapter"):
        adapter = make_adapter(target.cfg, k, meta["adapter"]["ffn_dim"])
        adapter.load_state_dict({n[len("adapter."):]: t for n, t in tensors.items() if n.startswith("adapter.")})
        adapter = adapter.to(target.dtype)
        adapter.eval().requires_grad_(False)
        from ..models.ops import pack_linears
        pack_linears(adapter)
    streams = None
    if meta.get("streams"):
        s = meta["streams"]
        streams = StreamEmbeddings(s["n_streams"], target.cfg.dim, s["n_layers"], s.get("rank", 0))
        streams.load_state_dict({n[len("streams."):]: t for n, t in tensors.items() if n.startswith("streams.")})
        streams.eval().requires_grad_(False)
    return DraftArtifact(k, adapter, streams, meta)


class ExitHead(nn.Module):
    """Trained early exit: h -> norm(h + (h A) B) -> target LM head, a rank-r residual update."""

    def __init__(self, target: Transformer, rank: int):
        super().__init__()
        self.target = [target]  # not a submodule: its weights are the target's
        self.down = nn.Parameter(torch.zeros(target.cfg.dim, rank))
        self.up = nn.Parameter(torch.zeros(rank, target.cfg.dim))

    def update(self, h: torch.Tensor) -> torch.Tensor:
        return h + (h @ self.down.to(h.dtype)) @ self.up.to(h.dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.target[0].head(self.update(h))


def load_exit_head(path: str, target: Transformer) -> ExitHead:
    tensors, meta = read_artifact(path)
    _check(meta, target, path)
    if not meta.get("exit_head"):
        raise ValueError(f"{path} holds no exit head")
    head = ExitHead(target, meta["exit_head"]["rank"])
    head.load_state_dict({n[len("exit_head."):]: t for n, t in tensors.items() if n.startswith("exit_head.")})
    return head.eval().requires_grad_(False)
