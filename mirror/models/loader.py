"""Load Llama-family weights from GGUF files and Hugging Face checkpoint folders.

Both paths produce a `ModelConfig` and a state dict in this package's naming (fused `wqkv`
and `w13`, see llama.py), so the model code never sees file formats.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ARCHITECTURES, ModelConfig
from .llama import Transformer


class ModelLoadError(ValueError):
    """A model file is missing, malformed, or uses something this package does not support."""


# GGML tensor types that gguf can dequantize and that we accept.
SUPPORTED_GGML_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
GGUF_ARCHS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: "object"  # mirror.tokenizer.Tokenizer
    path: str
    file_format: str  # "gguf" | "hf"


# ---------------------------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------------------------
def _read_gguf(path: str):
    from .gguf_file import GGUFFile

    try:
        return GGUFFile(path)
    except (ValueError, struct.error, UnicodeDecodeError, OSError) as e:  # not GGUF, truncated, ...
        raise ModelLoadError(f"{path}: not a readable GGUF file ({e})") from e


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def gguf_config(reader, path: str = "") -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHS:
        raise ModelLoadError(
            f"{path}: unsupported architecture {arch!r} (supported: {', '.join(GGUF_ARCHS)})")

    def a(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    n_heads = int(a("attention.head_count"))
    dim = int(a("embedding_length"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = int(a("vocab_size", 0) or (len(tokens.data) if tokens is not None else 0))
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    head_dim = int(a("attention.key_length", 0) or 0)
    sc = None
    stype = a("rope.scaling.type")
    if stype == "linear":
        sc = {"rope_type": "linear", "factor": float(a("rope.scaling.factor"))}
    return ModelConfig(
        arch=GGUF_ARCHS[arch],
        vocab_size=vocab,
        dim=dim,
        n_layers=int(a("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(a("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        ffn_dim=int(a("feed_forward_length")),
        norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(a("rope.freq_base", 10000.0)),
        rope_scaling=sc,
        max_seq_len=int(a("context_length", 4096)),
        tie_embeddings=tied,
        qkv_bias=any(t.name == "blk.0.attn_q.bias" for t in reader.tensors),
        qk_norm=any(t.name == "blk.0.attn_q_norm.weight" for t in reader.tensors),
        name=str(_field(reader, "general.name", "") or ""),
    )


def _dequantize(t) -> np.ndarray:
    import gguf

    qtype = t.tensor_type
    if qtype.name not in SUPPORTED_GGML_TYPES:
        raise ModelLoadError(
            f"tensor {t.name!r} uses quantization type {qtype.name}, which is not supported "
            f"(supported: {', '.join(SUPPORTED_GGML_TYPES)})")
    shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dims innermost-first
    if qtype.name == "F32":
        arr = np.asarray(t.data, dtype=np.float32)
    elif qtype.name == "F16":
        arr = np.asarray(t.data, dtype=np.float16).astype(np.float32)
    else:
        try:
            arr = gguf.quants.dequantize(t.data, qtype)
        except NotImplementedError as e:
            raise ModelLoadError(f"tensor {t.name!r}: gguf cannot dequantize {qtype.name}: {e}") from e
    # copy: the reader's arrays are read-only views of a memory map
    return np.array(arr.reshape(shape), dtype=np.float32, order="C", copy=True)


def _unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE) back to the rotate-half layout."""
    out = w.shape[0]
    return (w.reshape(n_heads, out // n_heads // 2, 2, *w.shape[1:])
             .swapaxes(1, 2).reshape(w.shape))


def load_gguf_state(path: str) -> tuple[ModelConfig, dict[str, torch.Tensor], object]:
    if not os.path.isfile(path):
        raise ModelLoadError(f"model file not found: {path}")
    reader = _read_gguf(path)
    cfg = gguf_config(reader, path)
    raw = {t.name: t for t in reader.tensors}
    permute = cfg.arch in ("llama", "mistral")  # llama.cpp permutes q/k only for these

    def get(name, required=True):
        t = raw.get(name)
        if t is None:
            if required:
                raise ModelLoadError(f"{path}: tensor {name!r} is missing")
            return None
        return torch.from_numpy(_dequantize(t))

    sd: dict[str, torch.Tensor] = {"tok_emb.weight": get("token_embd.weight"),
                                   "norm.weight": get("output_norm.weight")}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = get("output.weight")
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        q, k, v = get(p + "attn_q.weight"), get(p + "attn_k.weight"), get(p + "attn_v.weight")
        if permute:
            q, k = _unpermute_qk(q, cfg.n_heads), _unpermute_qk(k, cfg.n_kv_heads)
        sd[f"layers.{i}.wqkv.weight"] = torch.cat([q, k, v], 0)
        if cfg.qkv_bias:
            sd[f"layers.{i}.wqkv.bias"] = torch.cat(
                [get(p + "attn_q.bias"), get(p + "attn_k.bias"), get(p + "attn_v.bias")], 0)
        sd[f"layers.{i}.wo.weight"] = get(p + "attn_output.weight")
        sd[f"layers.{i}.attn_norm.weight"] = get(p + "attn_norm.weight")
        sd[f"layers.{i}.ffn_norm.weight"] = get(p + "ffn_norm.weight")
        if cfg.qk_norm:
            sd[f"layers.{i}.q_norm.weight"] = get(p + "attn_q_norm.weight")
            sd[f"layers.{i}.k_norm.weight"] = get(p + "attn_k_norm.weight")
        sd[f"layers.{i}.w13.weight"] = torch.cat([get(p + "ffn_gate.weight"), get(p + "ffn_up.weight")], 0)
        sd[f"layers.{i}.w2.weight"] = get(p + "ffn_down.weight")
    rope_freqs = get("rope_freqs.weight", required=False)
    if rope_freqs is not None:
        cfg.rope_scaling = {"rope_type": "freq_factors", "factors": rope_freqs.tolist()}
    return cfg, sd, reader


# ---------------------------------------------------------------------------------------------
# Hugging Face folders
# ---------------------------------------------------------------------------------------------
_HF_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}


def hf_config(d: dict, path: str = "") -> ModelConfig:
    mt = d.get("model_type")
    if mt not in _HF_TYPES:
        raise ModelLoadError(
            f"{path}: unsupported architecture {mt!r} (supported: {', '.join(_HF_TYPES)})")
    n_heads = d["num_attention_heads"]
    return ModelConfig(
        arch=_HF_TYPES[mt],
        vocab_size=d["vocab_size"],
        dim=d["hidden_size"],
        n_layers=d["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=d.get("num_key_value_heads") or n_heads,
        head_dim=d.get("head_dim") or 0,
        ffn_dim=d["intermediate_size"],
        norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=d.get("rope_theta", 10000.0),
        rope_scaling=d.get("rope_scaling"),
        max_seq_len=d.get("max_position_embeddings", 4096),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=bool(d.get("attention_bias", mt == "qwen2")),
        qk_norm=mt == "qwen3",
        name=d.get("_name_or_path", ""),
    )


def load_hf_state(path: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    p = Path(path)
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"{path}: no config.json (expected a Hugging Face checkpoint folder)")
    cfg = hf_config(json.loads(cfg_file.read_text()), path)
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors weight files")
    hf: dict[str, torch.Tensor] = {}
    for f in files:
        hf.update(load_file(str(f)))

    def get(name, required=True):
        if name not in hf:
            if required:
                raise ModelLoadError(f"{path}: tensor {name!r} is missing")
            return None
        return hf[name].float()

    sd = {"tok_emb.weight": get("model.embed_tokens.weight"), "norm.weight": get("model.norm.weight")}
    if not cfg.tie_embeddings:
        head = get("lm_head.weight", required=False)
        if head is None:  # some checkpoints tie without saying so
            cfg.tie_embeddings = True
        else:
            sd["lm_head.weight"] = head
    for i in range(cfg.n_layers):
        p_ = f"model.layers.{i}."
        a = p_ + "self_attn."
        sd[f"layers.{i}.wqkv.weight"] = torch.cat(
            [get(a + "q_proj.weight"), get(a + "k_proj.weight"), get(a + "v_proj.weight")], 0)
        if cfg.qkv_bias:
            sd[f"layers.{i}.wqkv.bias"] = torch.cat(
                [get(a + "q_proj.bias"), get(a + "k_proj.bias"), get(a + "v_proj.bias")], 0)
        sd[f"layers.{i}.wo.weight"] = get(a + "o_proj.weight")
        if cfg.qk_norm:
            sd[f"layers.{i}.q_norm.weight"] = get(a + "q_norm.weight")
            sd[f"layers.{i}.k_norm.weight"] = get(a + "k_norm.weight")
        sd[f"layers.{i}.attn_norm.weight"] = get(p_ + "input_layernorm.weight")
        sd[f"layers.{i}.ffn_norm.weight"] = get(p_ + "post_attention_layernorm.weight")
        m = p_ + "mlp."
        sd[f"layers.{i}.w13.weight"] = torch.cat([get(m + "gate_proj.weight"), get(m + "up_proj.weight")], 0)
        sd[f"layers.{i}.w2.weight"] = get(m + "down_proj.weight")
    return cfg, sd


def save_hf(model: Transformer, path: str, tokenizer=None) -> None:
    """Write `model` as a Hugging Face folder: config.json + model.safetensors (+ tokenizer.json)."""
    from safetensors.torch import save_file

    cfg = model.cfg
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    hd = cfg.head_dim
    model_type = cfg.arch
    d = {
        "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                           "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[model_type]],
        "model_type": model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": hd, "intermediate_size": cfg.ffn_dim,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": cfg.qkv_bias, "torch_dtype": "float32", "hidden_act": "silu",
    }
    (p / "config.json").write_text(json.dumps(d, indent=2))
    sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    qn, kn = cfg.n_heads * hd, cfg.n_kv_heads * hd
    for i in range(cfg.n_layers):
        a = f"model.layers.{i}.self_attn."
        q, k, v = sd[f"layers.{i}.wqkv.weight"].split([qn, kn, kn], 0)
        out[a + "q_proj.weight"], out[a + "k_proj.weight"], out[a + "v_proj.weight"] = q, k, v
        if cfg.qkv_bias:
            qb, kb, vb = sd[f"layers.{i}.wqkv.bias"].split([qn, kn, kn], 0)
            out[a + "q_proj.bias"], out[a + "k_proj.bias"], out[a + "v_proj.bias"] = qb, kb, vb
        out[a + "o_proj.weight"] = sd[f"layers.{i}.wo.weight"]
        if cfg.qk_norm:
            out[a + "q_norm.weight"] = sd[f"layers.{i}.q_norm.weight"]
            out[a + "k_norm.weight"] = sd[f"layers.{i}.k_norm.weight"]
        out[f"model.layers.{i}.input_layernorm.weight"] = sd[f"layers.{i}.attn_norm.weight"]
        out[f"model.layers.{i}.post_attention_layernorm.weight"] = sd[f"layers.{i}.ffn_norm.weight"]
        g, u = sd[f"layers.{i}.w13.weight"].chunk(2, 0)
        out[f"model.layers.{i}.mlp.gate_proj.weight"] = g.contiguous()
        out[f"model.layers.{i}.mlp.up_proj.weight"] = u.contiguous()
        out[f"model.layers.{i}.mlp.down_proj.weight"] = sd[f"layers.{i}.w2.weight"]
    save_file({k: v.contiguous() for k, v in out.items()}, str(p / "model.safetensors"))
    if tokenizer is not None:
        tokenizer.save_hf(str(p))


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def build_model(cfg: ModelConfig, sd: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                device="cpu") -> Transformer:
    with torch.device("meta"):  # no throwaway random init of the weights
        model = Transformer(cfg, dtype=dtype)
    model = model.to_empty(device=device)
    model.init_rope(torch.device(device))  # rope tables are not in the state dict
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False,
                                                assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
        missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise ModelLoadError(f"weights do not match the architecture: missing {missing}, "
                             f"unexpected {unexpected}")
    return model.prepare()


def load_model(path: str | None = None, dtype: torch.dtype = torch.float32,
               device="cpu", tokenizer: bool = True) -> LoadedModel:
    """Load a GGUF file or a Hugging Face folder; `None` means the bundled default model.
    `tokenizer=False` skips the tokenizer (drafts reuse the target's)."""
    from ..tokenizer import Tokenizer
    from .bundled import bundled_model_path

    if path is None:
        path = bundled_model_path()
    if os.path.isdir(path):
        cfg, sd = load_hf_state(path)
        model = build_model(cfg, sd, dtype=dtype, device=device)
        tok = Tokenizer.from_hf_dir(path) if tokenizer else None
        return LoadedModel(model, tok, path, "hf")
    if not os.path.exists(path):
        raise ModelLoadError(f"model file not found: {path}")
    cfg, sd, reader = load_gguf_state(path)
    model = build_model(cfg, sd, dtype=dtype, device=device)
    model.source_file = os.path.abspath(path)  # draft_quant=gguf reads the file's own blocks again
    tok = Tokenizer.from_gguf(reader) if tokenizer else None
    return LoadedModel(model, tok, path, "gguf")


def load_tokenizer(path: str | None = None):
    """(tokenizer, context length) of a model without loading its weights."""
    from ..tokenizer import Tokenizer
    from .bundled import bundled_model_path

    if path is None:
        path = bundled_model_path()
    if os.path.isdir(path):
        cfg = hf_config(json.loads((Path(path) / "config.json").read_text()), path)
        return Tokenizer.from_hf_dir(path), cfg.max_seq_len
    if not os.path.exists(path):
        raise ModelLoadError(f"model file not found: {path}")
    reader = _read_gguf(path)
    return Tokenizer.from_gguf(reader), gguf_config(reader, path).max_seq_len


__all__ = ["load_tokenizer", "ARCHITECTURES", "LoadedModel", "ModelLoadError", "SUPPORTED_GGML_TYPES", "build_model",
           "gguf_config", "hf_config", "load_gguf_state", "load_hf_state", "load_model", "save_hf"]
