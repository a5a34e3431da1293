"""Test helpers: tiny seeded models, a tiny byte-level tokenizer, and a GGUF writer."""
from __future__ import annotations

import numpy as np
import torch

from mirror.models import PRESETS, Transformer
from mirror.models.config import ModelConfig
from mirror.tokenizer import Tokenizer


def tiny_model(preset: str = "tiny", seed: int = 0, std: float = 0.25, **overrides) -> Transformer:
    """Seeded random weights; std 0.25 keeps greedy output varied (0.02 repeats one token)."""
    cfg = PRESETS[preset].with_(**overrides) if overrides else PRESETS[preset]
    return Transformer(cfg).init_weights(seed, std=std)


def byte_tokenizer(vocab_size: int = 256) -> Tokenizer:
    """A byte-level BPE tokenizer with no merges: ids 0..255 are bytes; eos = 0."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    byte_map = {}
    # GPT-2 byte-to-unicode order so id == byte value
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    for b, c in zip(bs, cs):
        byte_map[b] = chr(c)
    assert set(byte_map.values()) == set(alphabet)
    vocab = {byte_map[b]: b for b in range(256)}
    tok = HF(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return Tokenizer(tok, bos_id=None, eos_ids=[0], add_bos=False, chat_template=None)


def _permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation (rotate-half -> interleaved rows)."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
             .swapaxes(1, 2).reshape(w.shape))


def write_gguf(model: Transformer, path: str, arch: str | None = None, qtype: str = "F32",
               raw_type_override: str | None = None) -> None:
    """Write a model as a llama.cpp-style GGUF (q/k permuted for llama). `raw_type_override`
    labels one tensor with another GGML type, to produce files we must reject."""
    import gguf

    cfg: ModelConfig = model.cfg
    arch = arch or cfg.arch
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.head_dim != cfg.dim // cfg.n_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    qt = getattr(gguf.GGMLQuantizationType, qtype)

    def add(name, arr):
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if arr.ndim == 2 and qtype != "F32":
            q = gguf.quants.quantize(arr, qt)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qt)
        else:
            w.add_tensor(name, arr)

    add("token_embd.weight", sd["tok_emb.weight"])
    add("output_norm.weight", sd["norm.weight"])
    if not cfg.tie_embeddings:
        add("output.weight", sd["lm_head.weight"])
    hd = cfg.head_dim
    qn, kn = cfg.n_heads * hd, cfg.n_kv_heads * hd
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        qkv = sd[f"layers.{i}.wqkv.weight"]
        q, k, v = qkv[:qn], qkv[qn:qn + kn], qkv[qn + kn:]
        if arch in ("llama", "mistral"):
            q, k = _permute_qk(q, cfg.n_heads), _permute_qk(k, cfg.n_kv_heads)
        add(p + "attn_q.weight", q)
        add(p + "attn_k.weight", k)
        add(p + "attn_v.weight", v)
        if cfg.qkv_bias:
            b = sd[f"layers.{i}.wqkv.bias"]
            add(p + "attn_q.bias", b[:qn])
            add(p + "attn_k.bias", b[qn:qn + kn])
            add(p + "attn_v.bias", b[qn + kn:])
        if cfg.qk_norm:
            add(p + "attn_q_norm.weight", sd[f"layers.{i}.q_norm.weight"])
            add(p + "attn_k_norm.weight", sd[f"layers.{i}.k_norm.weight"])
        add(p + "attn_output.weight", sd[f"layers.{i}.wo.weight"])
        add(p + "attn_norm.weight", sd[f"layers.{i}.attn_norm.weight"])
        add(p + "ffn_norm.weight", sd[f"layers.{i}.ffn_norm.weight"])
        g, u = np.split(sd[f"layers.{i}.w13.weight"], 2, axis=0)
        add(p + "ffn_gate.weight", g)
        add(p + "ffn_up.weight", u)
        if raw_type_override and i == 0:
            # bytes that claim to be a type we do not dequantize
            rt = getattr(gguf.GGMLQuantizationType, raw_type_override)
            bs, ts = gguf.GGML_QUANT_SIZES[rt]
            d = sd[f"layers.{i}.w2.weight"]
            nbytes = d.shape[0] * (d.shape[1] // bs) * ts
            w.add_tensor(p + "ffn_down.weight", np.zeros((d.shape[0], nbytes // d.shape[0]), np.uint8),
                         raw_shape=(d.shape[0], nbytes // d.shape[0]), raw_dtype=rt)
        else:
            add(p + "ffn_down.weight", sd[f"layers.{i}.w2.weight"])
    w.add_tokenizer_model("gpt2")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def greedy_reference(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """Greedy decode by recomputing the whole sequence each step (no cache tricks)."""
    ids = list(prompt)
    for _ in range(n):
        c = model.new_cache(1, len(ids) + 1)
        logits = model(torch.tensor([ids]), torch.arange(len(ids))[None], c, last_only=True)
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]
