"""Peers for `mirror bench --peers`: Hugging Face transformers on the same weights, same process.

The bundled (or given) model is written with `mirror.models.save_hf` (config.json + safetensors,
fp32 - the weights our engine runs, already dequantized) and loaded as a transformers model.
Three peers, each greedy/sampled like the run:
  hf:plain     `generate()` - transformers' plain decoding
  hf:pld       prompt-lookup decoding (`prompt_lookup_num_tokens`)
  hf:assisted  assisted generation; the draft is the target's first k layers (+ final norm and
               LM head) as a separate small model sharing the tokenizer - untrained, so it shows
               what a cheap-but-inaccurate draft costs - or, with `draft_model`, a Hugging Face
               folder such as the one `mirror distill-draft` writes (the same draft our
               `model` / `ngram+model` drafts run)
Prompts are our token ids (no second tokenizer). Timing is the generate call, prefill included,
as for our methods. Outputs stop at the first EOS; the EOS is not counted.
"""
from __future__ import annotations

import tempfile
import time

import torch

INSTALL = "pip install 'mirror-sd[peers]' (or: pip install transformers)"


class PeersUnavailable(RuntimeError):
    pass


def _dtype_kw(transformers) -> str:
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


class HFPeers:
    """One transformers target (and assisted-generation draft) built from our loaded model."""

    def __init__(self, lm, draft_layers: int = 4, pld_tokens: int = 10, workdir: str | None = None,
                 draft_model: str | None = None):
        try:
            import transformers
        except ImportError as e:
            raise PeersUnavailable(f"Hugging Face transformers is not installed: {INSTALL}") from e
        from transformers import AutoModelForCausalLM

        transformers.logging.set_verbosity_error()  # its deprecation chatter would swamp the progress bar

        from mirror.models import save_hf

        self.tokenizer = lm.tokenizer
        self.pld_tokens = pld_tokens
        kw = {_dtype_kw(transformers): torch.float32}
        self._tmp = tempfile.TemporaryDirectory(prefix="mirror-peers-") if workdir is None else None
        root = workdir or self._tmp.name
        save_hf(lm.model, f"{root}/target")
        self.target = AutoModelForCausalLM.from_pretrained(f"{root}/target", **kw).eval()
        self.draft = None
        n = lm.model.cfg.n_layers
        if draft_model is not None:
            try:
                self.draft = AutoModelForCausalLM.from_pretrained(draft_model, **kw).eval()
            except (OSError, ValueError) as e:
                raise PeersUnavailable(f"cannot load the assisted-generation draft {draft_model}: {e}") from e
            if self.draft.config.vocab_size != self.target.config.vocab_size:
                raise PeersUnavailable(f"draft {draft_model} has vocab {self.draft.config.vocab_size}, the "
                                       f"target {self.target.config.vocab_size}")
        elif 1 <= draft_layers < n:
            cfg = self.target.config.__class__.from_dict(
                {**self.target.config.to_dict(), "num_hidden_layers": draft_layers})
            self.draft = AutoModelForCausalLM.from_config(cfg, **kw).eval()
            missing = self.draft.load_state_dict(self.target.state_dict(), strict=False).missing_keys
            if [k for k in missing if k != "lm_head.weight"]:
                raise PeersUnavailable(f"could not build the {draft_layers}-layer draft: missing {missing}")
            if cfg.tie_word_embeddings:
                self.draft.tie_weights()
        self.eos = list(lm.tokenizer.eos_ids)

    def generate(self, mode: str, prompt_ids: list[int], params, label: str):
        from mirror.decoding.result import GenerationResult, Metrics

        ids = torch.tensor([prompt_ids])
        kw = dict(max_new_tokens=params.max_new_tokens, do_sample=not params.greedy,
                  eos_token_id=self.eos or None, pad_token_id=(self.eos or [0])[0],
                  attention_mask=torch.ones_like(ids))
        if not params.greedy:
            kw.update(temperature=params.temperature, top_k=params.top_k or None, top_p=params.top_p)
            if params.seed is not None:
                torch.manual_seed(params.seed)
        if mode == "pld":
            kw["prompt_lookup_num_tokens"] = self.pld_tokens
        elif mode == "assisted":
            kw["assistant_model"] = self.draft
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.target.generate(ids, **kw)[0, len(prompt_ids):].tolist()
        wall = time.perf_counter() - t0
        finish = "length"
        for i, t in enumerate(out):
            if t in self.eos:
                out, finish = out[:i], "stop"
                break
        m = Metrics(prompt_tokens=len(prompt_ids), new_tokens=len(out), decode_s=wall)
        m.extra["no_prefill_split"] = True  # decode_s is the whole call: transformers does not split it
        return GenerationResult(out, self.tokenizer.decode(out, skip_special_tokens=True), finish, m,
                                method=label)


class PeerEngine:
    """A bench engine for one peer mode (the spec argument is ignored)."""

    def __init__(self, peers: HFPeers, mode: str, label: str):
        self.peers, self.mode, self.name = peers, mode, label

    def generate(self, prompt_ids, params, spec=None):
        return self.peers.generate(self.mode, prompt_ids, params, self.name)


PEER_MODES = ("plain", "pld", "assisted")


def check_modes(modes) -> list[str]:
    """The peer modes asked for (all when none), in order; ValueError names an unknown one."""
    want = list(dict.fromkeys(modes or PEER_MODES))
    bad = [m for m in want if m not in PEER_MODES]
    if bad:
        raise ValueError(f"unknown peer mode(s) {bad}; choose from {list(PEER_MODES)}")
    return want


def peer_methods(lm, draft_layers: int = 4, pld_tokens: int = 10, draft_model: str | None = None,
                 modes=None) -> list:
    """Bench methods hf:plain, hf:pld and (when a draft fits) hf:assisted; `modes` picks some."""
    from .bench import Method

    want = check_modes(modes)
    peers = HFPeers(lm, draft_layers=draft_layers if "assisted" in want else 0, pld_tokens=pld_tokens,
                    draft_model=draft_model if "assisted" in want else None)
    modes = [m for m in want if m != "assisted" or peers.draft is not None]
    return [Method(f"hf:{m}", None, PeerEngine(peers, m, f"hf:{m}"), peer=True) for m in modes]
