"""Tokenizers built with the `tokenizers` library from GGUF metadata or a Hugging Face folder,
plus chat templates rendered with jinja2 and an incremental detokenizer for streaming."""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

# Pre-tokenizer regexes of llama.cpp's `tokenizer.ggml.pre` values (llama-vocab.cpp).
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_GGML_CONTROL, _GGML_USER_DEFINED, _GGML_BYTE = 3, 4, 6


class TokenizerError(ValueError):
    pass


def _bpe_pre_tokenizer(pre: str):
    if pre in ("smollm",):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in ("llama-bpe", "llama3", "dbrx", "smaug-bpe"):
        regex = _LLAMA3_RE
    elif pre in ("qwen2", "deepseek-r1-qwen"):
        regex = _QWEN2_RE
    elif pre in ("gpt-2", "gpt2", "default", "", None):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        raise TokenizerError(f"unsupported GGUF pre-tokenizer {pre!r}")
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _spm_merges(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """Merges for a SentencePiece-BPE vocab, ranked by the merged piece's score (as HF does)."""
    ranked = []
    for piece, pid in vocab.items():
        for i in range(1, len(piece)):
            a, b = piece[:i], piece[i:]
            if a in vocab and b in vocab:
                ranked.append((-scores[pid], vocab[a], vocab[b], a, b))
    ranked.sort()
    return [(a, b) for _, _, _, a, b in ranked]


class Tokenizer:
    def __init__(self, tok: HFTokenizer, bos_id: int | None, eos_ids: list[int],
                 add_bos: bool, chat_template: str | None, bos_token: str = "", eos_token: str = ""):
        self.tok = tok
        self.bos_id = bos_id
        self.eos_ids = list(dict.fromkeys(i for i in eos_ids if i is not None))
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, reader) -> "Tokenizer":
        def field(key, default=None):
            f = reader.fields.get(key)
            return default if f is None else f.contents()

        kind = field("tokenizer.ggml.model")
        tokens = field("tokenizer.ggml.tokens")
        if not tokens:
            raise TokenizerError("GGUF file has no tokenizer.ggml.tokens")
        types = field("tokenizer.ggml.token_type") or [1] * len(tokens)
        vocab = {t: i for i, t in enumerate(tokens)}
        if kind == "gpt2":
            merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges", [])]
            tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
            tok.pre_tokenizer = _bpe_pre_tokenizer(field("tokenizer.ggml.pre", "default"))
            tok.decoder = decoders.ByteLevel()
        elif kind == "llama":
            scores = field("tokenizer.ggml.scores") or [0.0] * len(tokens)
            tok = HFTokenizer(models.BPE(vocab=vocab, merges=_spm_merges(vocab, scores),
                                         byte_fallback=True, fuse_unk=True,
                                         unk_token=tokens[field("tokenizer.ggml.unknown_token_id", 0)]))
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first",
                                                         split=False)
            tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                             decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        else:
            raise TokenizerError(f"unsupported GGUF tokenizer model {kind!r} (supported: gpt2, llama)")
        specials = [AddedToken(t, special=True, normalized=False)
                    for t, ty in zip(tokens, types) if ty in (_GGML_CONTROL, _GGML_USER_DEFINED)]
        tok.add_special_tokens(specials)
        bos = field("tokenizer.ggml.bos_token_id")
        eos = field("tokenizer.ggml.eos_token_id")
        eot = field("tokenizer.ggml.eot_token_id")
        add_bos = bool(field("tokenizer.ggml.add_bos_token", kind == "llama"))
        return cls(tok, bos, [eos, eot], add_bos, field("tokenizer.chat_template"),
                   tokens[bos] if bos is not None else "", tokens[eos] if eos is not None else "")

    @classmethod
    def from_hf_dir(cls, path: str) -> "Tokenizer":
        p = Path(path)
        if not (p / "tokenizer.json").is_file():
            raise TokenizerError(f"{path}: no tokenizer.json")
        tok = HFTokenizer.from_file(str(p / "tokenizer.json"))
        tc = json.loads((p / "tokenizer_config.json").read_text()) if (p / "tokenizer_config.json").is_file() else {}
        gc = json.loads((p / "generation_config.json").read_text()) if (p / "generation_config.json").is_file() else {}

        def tok_str(x):
            return x.get("content") if isinstance(x, dict) else x

        bos_t, eos_t = tok_str(tc.get("bos_token")), tok_str(tc.get("eos_token"))
        bos = tok.token_to_id(bos_t) if bos_t else gc.get("bos_token_id")
        eos = [tok.token_to_id(eos_t)] if eos_t else []
        ge = gc.get("eos_token_id")
        eos += ge if isinstance(ge, list) else [ge]
        return cls(tok, bos, eos, bool(tc.get("add_bos_token", False)), tc.get("chat_template"),
                   bos_t or "", eos_t or "")

    def save_hf(self, path: str) -> None:
        p = Path(path)
        self.tok.save(str(p / "tokenizer.json"))
        (p / "tokenizer_config.json").write_text(json.dumps({
            "bos_token": self.bos_token, "eos_token": self.eos_token, "add_bos_token": self.add_bos,
            "chat_template": self.chat_template}, indent=2))
        (p / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": self.bos_id, "eos_token_id": self.eos_ids}, indent=2))

    # --- use ----------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            if not ids or ids[0] != self.bos_id:
                ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise TokenizerError("this model has no chat template; use raw prompts")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

            def raise_exception(msg):
                raise TokenizerError(f"chat template: {msg}")

            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token, eos_token=self.eos_token)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        text = self.apply_chat_template(messages)
        # the template writes BOS itself when the model wants one
        return self.encode(text, add_bos=self.add_bos and not text.startswith(self.bos_token or "\0"))


class IncrementalDetokenizer:
    """Turns a growing id sequence into text deltas without re-decoding everything and without
    emitting half of a multi-byte character (vLLM's prefix/read offset scheme)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        dec = self.tokenizer.decode
        prefix = dec(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = dec(self.ids[self.prefix_offset:], self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""
