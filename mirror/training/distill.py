"""`mirror distill-draft`: a separate small draft model distilled from the target.

The draft is a k-layer model of the target's architecture, initialised from the target's first
k layers, final norm and (tied) embedding, and trained on the target's own greedy answers to
training prompts (never Spec-Bench) to predict the target's next token behind a VocabTrim head.
The answers are the ones `mirror build-datastore` caches (`answers.jsonl`: pass its folder with
--answers to reuse them); missing ones are generated. Embedding and head stay the target's, so
only the k blocks and the norm are trained. Seeded; checkpointed every minute; resumes.

The result is a Hugging Face folder (`config.json`, `model.safetensors`, `draft.json` naming the
VocabTrim set it was trained behind) that `draft: model` / `draft: ngram+model` load with
`draft_model: <folder>`.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..decoding.drafters.vocab_trim import VocabTrim
from ..models.llama import Transformer
from ..models.ops import Linear, pack_linears
from .datastore import target_pairs
from .layers import block_train


class SmallDraft(torch.nn.Module):
    """Trainable view: k blocks copied from the target + its final norm; embedding and the
    (trimmed) head are the target's, frozen."""

    def __init__(self, target: Transformer, k: int, keep_ids: torch.Tensor):
        super().__init__()
        blocks = []
        for blk in target.layers[:k]:  # oneDNN-packed copies cannot be deep-copied or trained
            for m in blk.modules():
                if isinstance(m, Linear):
                    m.unpack()
            blocks.append(copy.deepcopy(blk))
            pack_linears(blk)  # the target keeps its packed weights for inference
        self.blocks = torch.nn.ModuleList(blocks)
        self.norm = copy.deepcopy(target.norm)
        for p in self.parameters():
            p.requires_grad_(True)
        self.emb = target.tok_emb.weight.detach()
        self.head_w = target.lm_head.weight.detach()[keep_ids]
        self.cos, self.sin = target.rope_cos, target.rope_sin

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        L = ids.shape[1]
        h = F.embedding(ids, self.emb)
        for blk in self.blocks:
            h = block_train(blk, h, self.cos[:L], self.sin[:L], None)
        return self.norm(h)

    def to_model(self, target: Transformer) -> Transformer:
        """The trained draft as an inference Transformer (k layers, the target's embedding)."""
        k = len(self.blocks)
        m = Transformer(target.cfg.with_(n_layers=k))
        sd = {f"layers.{i}.{n}": p for i, b in enumerate(self.blocks) for n, p in b.state_dict().items()}
        sd.update({f"norm.{n}": p for n, p in self.norm.state_dict().items()})
        sd["tok_emb.weight"] = self.emb
        if not target.cfg.tie_embeddings:
            sd["lm_head.weight"] = target.lm_head.weight.detach()
        m.load_state_dict({k_: v.detach().clone() for k_, v in sd.items()}, strict=False)
        return m.prepare()


def _examples(pairs, lut: torch.Tensor, context: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels): the last `context` prompt tokens + the answer; labels are the
    answer's tokens in draft-vocabulary ids (-1: not predicted, or outside the trimmed vocab)."""
    out = []
    for p, ans in pairs:
        if not ans:
            continue
        p = p[-context:]
        labels = [-1] * (len(p) - 1) + [int(lut[t]) for t in ans] + [-1]
        out.append((p + ans, labels))
    return out


def _batches(examples, batch_tokens: int) -> list[list[int]]:
    """Indices grouped by length so that (longest x rows) <= batch_tokens."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    out, cur, longest = [], [], 0
    for i in order:
        n = len(examples[i][0])
        if cur and max(longest, n) * (len(cur) + 1) > batch_tokens:
            out.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        out.append(cur)
    return out


def cpu_has_fast_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16). Elsewhere bf16
    autocast is emulated: measured 60 s per distill-draft step on an AVX2-only AMD EPYC core
    pair against 1.8 s in fp32, so training falls back to fp32 there."""
    try:
        with open(cpuinfo) as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def distill_draft(target: Transformer, tok, data: str, out: str, *, answers_dir: str | None = None,
                  prompts: int = 3000, layers: int = 4, epochs: int = 2, lr: float = 1e-3,
                  batch_tokens: int = 2048, context: int = 128, vocab_trim: str = "bundled",
                  bf16: bool = True, seed: int = 0, max_new_tokens: int = 128, log=print) -> dict:
    from ..models.bundled import resolve_artifact
    from ..models.loader import save_hf

    if not 1 <= layers < target.cfg.n_layers:
        raise ValueError(f"--layers must be in [1, {target.cfg.n_layers - 1}], got {layers}")
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    adir = answers_dir or str(outp)
    pairs = target_pairs(target, tok, data, prompts, adir, max_new_tokens, seed=seed, log=log)
    trim_path = resolve_artifact(vocab_trim, "vocab_trim")
    trim = VocabTrim.load(trim_path)
    lut = torch.full((target.cfg.vocab_size,), -1, dtype=torch.long)
    lut[trim.keep_ids] = torch.arange(len(trim))
    examples = _examples(pairs, lut, context)
    batches = _batches(examples, batch_tokens)
    steps_total = max(1, round(len(batches) * epochs))
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps_total:
        order += torch.randperm(len(batches), generator=g).tolist()
    order = order[:steps_total]

    torch.manual_seed(seed)
    draft = SmallDraft(target, layers, trim.keep_ids)
    params = list(draft.parameters())  # the blocks and the norm (embedding and head are plain tensors)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 30) * 0.5 * (1 + math.cos(math.pi * min(s, steps_total) / steps_total)))
    settings = {"prompts": prompts, "layers": layers, "epochs": epochs, "lr": lr, "batch_tokens": batch_tokens,
                "context": context, "vocab_trim": os.path.basename(trim_path), "bf16": bf16, "seed": seed}
    ckpt = outp / "ckpt.pt"
    step, run_loss, first_loss = 0, None, None
    if ckpt.is_file():
        st = torch.load(ckpt, weights_only=False)
        if st["settings"] != settings:
            raise ValueError(f"{ckpt} was made with other settings ({st['settings']}); use another --out")
        draft.load_state_dict(st["draft"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        step, run_loss, first_loss = st["step"], st["loss"], st.get("first_loss")
        log(f"[distill-draft] resuming at step {step}/{steps_total}")
    draft.train()
    last_save = time.time()
    bar = tqdm(range(step, steps_total), initial=step, total=steps_total, desc="distill-draft", unit="step")
    for s in bar:
        rows = [examples[i] for i in batches[order[s]]]
        L = max(len(x) for x, _ in rows)
        X = torch.tensor([x + [0] * (L - len(x)) for x, _ in rows])
        Y = torch.tensor([y + [-1] * (L - len(y)) for _, y in rows])
        m = Y >= 0
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = F.linear(draft.hidden(X)[m], draft.head_w)
        loss = F.cross_entropy(logits.float(), Y[m])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if first_loss is None:
            first_loss = loss.item()
        run_loss = loss.item() if run_loss is None else 0.97 * run_loss + 0.03 * loss.item()
        bar.set_postfix(loss=f"{run_loss:.3f}")
        if time.time() - last_save > 60 or s + 1 == steps_total:
            torch.save({"settings": settings, "draft": draft.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "step": s + 1, "loss": run_loss, "first_loss": first_loss}, ckpt)
            last_save = time.time()
    draft.eval()
    mdir = outp / "model"
    save_hf(draft.to_model(target), str(mdir))
    shutil.copyfile(trim_path, mdir / "vocab_trim.json")
    report = {"settings": settings, "sequences": len(examples),
              "answer_tokens": sum(len(a) for _, a in pairs), "steps": steps_total, "first_loss": first_loss,
              "final_loss": run_loss,
              "minutes": round((time.time() - t0) / 60, 1), "source": os.path.basename(data)}
    (mdir / "draft.json").write_text(json.dumps({"vocab_trim": "vocab_trim.json", **report}, indent=1))
    log(f"[distill-draft] {layers}-layer draft in {mdir} (loss {run_loss:.3f}, {report['minutes']} min)")
    return report
