"""`mirror train-draft`: self-distillation of the draft's trainable parts from the target.

Phases (each checkpointed in --out; an interrupted run resumes where it stopped):
  1. corpus  - the target's own greedy answers to training prompts (batched decoding), then the
               target's teacher-forced hidden states and top-K next-token distributions;
  2. vocab   - a VocabTrim token set: the most frequent tokens of the target-generated text;
  3. adapter - the self-draft adapter (Kangaroo: one block on the target's layer-k hidden state,
               then the target's norm + LM head) and, jointly, speculative-streaming stream
               embeddings: loss = next-token KL + 0.1 x future-token KL;
  4. exit    - a rank-r early-exit head at l_e that raises Omega_kappa;
  5. report  - held-out top-1 agreement and Omega, written with the artifact.
Everything is seeded; the artifact is produced by this command, never downloaded.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..decoding.artifacts import ExitHead, save_artifact, target_fingerprint
from ..decoding.drafters.network import make_adapter
from ..decoding.drafters.streaming import StreamEmbeddings
from ..decoding.drafters.vocab_trim import VocabTrim
from ..models.llama import Transformer
from .corpus import Features, build_features, load_prompts
from .layers import block_train, stream_mask, stream_positions


@dataclass
class TrainConfig:
    data: str
    out: str
    draft_layers: int = 4
    adapter_ffn: int = 1536
    exit_layer: int = 0  # 0 -> 2N/3
    prompts: int = 600
    max_new_tokens: int = 128
    gen_batch: int = 16
    top_k: int = 32
    vocab_size: int = 8192  # VocabTrim set size (0 = no trim)
    streams: int = 2
    stream_rank: int = 0
    exit_rank: int = 64
    exit_tokens: int = 40000  # positions used to train the exit head (full-vocab softmax is costly)
    epochs: int = 2
    lr: float = 1e-3
    accum: int = 8  # sequences per optimizer step
    holdout: float = 0.05
    seed: int = 0
    parts: list[str] = field(default_factory=lambda: ["adapter", "streams", "exit_head"])

    def __post_init__(self) -> None:
        bad = set(self.parts) - {"adapter", "streams", "exit_head"}
        if bad:
            raise ValueError(f"unknown parts {sorted(bad)}; choose from adapter, streams, exit_head")
        if "streams" in self.parts and "adapter" not in self.parts:
            raise ValueError("streams are trained on top of the adapter: include 'adapter'")
        for name in ("draft_layers", "prompts", "max_new_tokens", "gen_batch", "top_k", "epochs", "accum"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


class Trainer:
    def __init__(self, target: Transformer, tokenizer, cfg: TrainConfig, log=print):
        self.t, self.tok, self.cfg, self.log = target, tokenizer, cfg, log
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        N = target.cfg.n_layers
        self.k = cfg.draft_layers
        if not 1 <= self.k < N:
            raise ValueError(f"draft_layers must be in [1, {N - 1}]")
        self.le = cfg.exit_layer or max(1, (2 * N) // 3)
        self.state_file = self.out / "state.json"
        self.state = self._load_state()
        self.timings: dict[str, float] = self.state.get("timings", {})

    # --- bookkeeping ----------------------------------------------------------------------------
    def _load_state(self) -> dict:
        if self.state_file.is_file():
            st = json.loads(self.state_file.read_text())
            mine = {k: v for k, v in asdict(self.cfg).items() if k != "out"}
            theirs = {k: v for k, v in st.get("config", {}).items() if k != "out"}
            if mine != theirs:
                raise ValueError(f"{self.out} holds a run with a different configuration; use another --out")
            return st
        return {"config": asdict(self.cfg), "done": []}

    def _save_state(self) -> None:
        self.state["timings"] = self.timings
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2))
        os.replace(tmp, self.state_file)

    def _phase(self, name: str, fn):
        if name in self.state["done"]:
            self.log(f"[train-draft] {name}: done earlier, skipped")
            return
        t0 = time.time()
        fn()
        self.timings[name] = self.timings.get(name, 0.0) + time.time() - t0
        self.state["done"].append(name)
        self._save_state()

    def _seed(self, salt: int) -> None:
        random.seed(self.cfg.seed + salt)
        torch.manual_seed(self.cfg.seed + salt)

    # --- phases ---------------------------------------------------------------------------------
    def run(self) -> dict:
        self._phase("corpus", self.build_corpus)
        self.feats: list[Features] = torch.load(self.out / "corpus.pt", weights_only=False)
        n_hold = max(1, int(len(self.feats) * self.cfg.holdout))
        self.train_set, self.hold_set = self.feats[n_hold:], self.feats[:n_hold]
        self._phase("vocab", self.build_vocab)
        self.trim = VocabTrim.load(str(self.out / "vocab_trim.json")) if self.cfg.vocab_size else None
        if "adapter" in self.cfg.parts:
            self._phase("adapter", self.train_adapter)
        if "exit_head" in self.cfg.parts:
            self._phase("exit", self.train_exit)
        self._phase("report", self.write_report)
        return json.loads((self.out / "report.json").read_text())

    def build_corpus(self) -> None:
        c = self.cfg
        self._seed(1)
        prompts = load_prompts(c.data, c.prompts, c.seed)
        feats = build_features(self.t, self.tok, prompts, c.max_new_tokens, c.gen_batch, [self.k, self.le],
                               top_k=c.top_k)
        torch.save(feats, self.out / "corpus.pt")
        n_tok = sum(len(f.ids) for f in feats)
        n_ans = sum(len(f.ids) - f.n_prompt for f in feats)
        self.state["corpus"] = {"sequences": len(feats), "tokens": n_tok, "answer_tokens": n_ans}
        self.log(f"[train-draft] corpus: {len(feats)} sequences, {n_tok} tokens ({n_ans} target-generated)")

    def build_vocab(self) -> None:
        from collections import Counter

        from ..decoding.drafters.ngram import NgramModel

        # the n-gram datastore: the target's own answers (its typical phrasing), for the n-gram draft
        store = NgramModel.build([f.ids[f.n_prompt:].tolist() for f in self.train_set], n_min=1, n_max=4,
                                 min_count=2, meta={"source": os.path.basename(self.cfg.data), "seed": self.cfg.seed,
                                                    "target": target_fingerprint(self.t)})
        store.save(str(self.out / "datastore.json"))
        self.state["datastore"] = {"entries": len(store)}
        self.log(f"[train-draft] n-gram datastore: {len(store)} entries")
        if not self.cfg.vocab_size:
            return
        counts = Counter()
        for f in self.train_set:
            counts.update(f.ids[f.n_prompt:].tolist())  # target-generated text
            counts.update(f.top_ids[:, 0].tolist())  # and the target's top-1 everywhere
        trim = VocabTrim.from_counts(counts, self.t.cfg.vocab_size, self.cfg.vocab_size,
                                     always=self.tok.eos_ids, meta={"source": self.cfg.data})
        trim.save(str(self.out / "vocab_trim.json"))
        hold = Counter()
        for f in self.hold_set:
            hold.update(f.ids[f.n_prompt:].tolist())
        self.state["vocab"] = {"size": len(trim), "heldout_coverage": trim.coverage(hold)}
        self.log(f"[train-draft] vocab trim: {len(trim)} tokens, held-out coverage {trim.coverage(hold):.3f}")

    # --- adapter (+ streams) ----------------------------------------------------------------------
    def _head(self):
        w = self.t.lm_head.weight.detach()
        if self.trim is None:
            return w, None
        lut = torch.full((self.t.cfg.vocab_size,), -1, dtype=torch.long)
        lut[self.trim.keep_ids] = torch.arange(len(self.trim))
        return w[self.trim.keep_ids], lut

    def _soft_ce(self, logits: torch.Tensor, top_ids: torch.Tensor, top_p: torch.Tensor, lut) -> torch.Tensor:
        """Cross-entropy of the draft against the target's top-K distribution (renormalised to
        the draft's vocabulary): mean over positions of -sum_j p_j log q(id_j)."""
        logq = torch.log_softmax(logits.float(), -1)
        p = top_p.float()
        idx = top_ids
        if lut is not None:
            idx = lut[top_ids]
            p = p * (idx >= 0)
            idx = idx.clamp(min=0)
        p = p / p.sum(-1, keepdim=True).clamp(min=1e-9)
        return -(p * logq.gather(-1, idx)).sum(-1).mean()

    def _draft_forward(self, adapter, streams, f: Features, n_streams: int):
        """Returns (main logits [S, V'], stream logits [S, n_streams, V'] or None)."""
        h = f.hidden[self.k].float()[None]  # [1, S, dim]
        S = h.shape[1]
        W, _ = self._head()
        if streams is None:
            pos = torch.arange(S)
            y = block_train(adapter, h, self.t.rope_cos[pos], self.t.rope_sin[pos], None)
            return F.linear(self.t.norm(y), W)[0], None
        sx = streams(h[0])  # [S, n, dim]
        x = torch.cat([h, sx.reshape(1, S * n_streams, -1)], dim=1)
        pos = stream_positions(S, n_streams).clamp(max=self.t.cfg.max_seq_len - 1)
        y = block_train(adapter, x, self.t.rope_cos[pos], self.t.rope_sin[pos], stream_mask(S, n_streams))
        logits = F.linear(self.t.norm(y), W)[0]
        return logits[:S], logits[S:].view(S, n_streams, -1)

    def train_adapter(self) -> None:
        c = self.cfg
        self._seed(2)
        n_streams = c.streams if "streams" in c.parts else 0
        adapter = make_adapter(self.t.cfg, self.k, c.adapter_ffn)
        streams = StreamEmbeddings(n_streams, self.t.cfg.dim, 1, c.stream_rank) if n_streams else None
        params = list(adapter.parameters()) + (list(streams.parameters()) if streams else [])
        opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=0.0)
        steps_total = math.ceil(len(self.train_set) / c.accum) * c.epochs
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, steps_total) / steps_total)))
        ckpt = self.out / "ckpt_adapter.pt"
        step, start_epoch, start_i = 0, 0, 0
        if ckpt.is_file():  # resume mid-phase
            st = torch.load(ckpt, weights_only=False)
            adapter.load_state_dict(st["adapter"])
            if streams is not None:
                streams.load_state_dict(st["streams"])
            opt.load_state_dict(st["opt"])
            sched.load_state_dict(st["sched"])
            step, start_epoch, start_i = st["step"], st["epoch"], st["i"]
            torch.set_rng_state(st["rng"])
            self.log(f"[train-draft] adapter: resuming at epoch {start_epoch}, sequence {start_i}")
        _, lut = self._head()
        adapter.train()
        last_save = time.time()
        for epoch in range(start_epoch, c.epochs):
            order = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(c.seed + epoch)).tolist()
            bar = tqdm(range(start_i if epoch == start_epoch else 0, len(order)), desc=f"adapter epoch {epoch + 1}/{c.epochs}",
                       unit="seq")
            run_loss = None
            for i in bar:
                f = self.train_set[order[i]]
                main, st_logits = self._draft_forward(adapter, streams, f, n_streams)
                loss = self._soft_ce(main, f.top_ids, f.top_p, lut)
                if st_logits is not None:
                    S = main.shape[0]
                    for kk in range(1, n_streams + 1):
                        if S > kk:  # stream k at t predicts the token after t + k
                            loss = loss + 0.1 * self._soft_ce(st_logits[:S - kk, kk - 1], f.top_ids[kk:], f.top_p[kk:], lut)
                (loss / c.accum).backward()
                run_loss = loss.item() if run_loss is None else 0.98 * run_loss + 0.02 * loss.item()
                if (i + 1) % c.accum == 0 or i + 1 == len(order):
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    step += 1
                    bar.set_postfix(loss=f"{run_loss:.3f}")
                    if time.time() - last_save > 60:
                        torch.save({"adapter": adapter.state_dict(), "streams": streams.state_dict() if streams else None,
                                    "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step,
                                    "epoch": epoch, "i": i + 1, "rng": torch.get_rng_state()}, ckpt)
                        last_save = time.time()
        adapter.eval()
        self.adapter, self.streams = adapter, streams
        tensors = {f"adapter.{n}": p for n, p in adapter.state_dict().items()}
        if streams is not None:
            tensors.update({f"streams.{n}": p for n, p in streams.state_dict().items()})
        save_artifact(str(self.out / "adapter.safetensors"), tensors, {})
        self.log(f"[train-draft] adapter trained ({step} optimizer steps)")

    # --- exit head -------------------------------------------------------------------------------
    def train_exit(self) -> None:
        c = self.cfg
        self._seed(3)
        head = ExitHead(self.t, c.exit_rank)
        torch.nn.init.normal_(head.down, std=0.02)  # up stays zero: starts as the untrained exit
        opt = torch.optim.AdamW([head.down, head.up], lr=c.lr)
        # a fixed random subset of positions, processed in chunks
        pos_list = []
        for fi, f in enumerate(self.train_set):
            pos_list += [(fi, t) for t in range(len(f.ids))]
        g = torch.Generator().manual_seed(c.seed + 3)
        pick = torch.randperm(len(pos_list), generator=g)[:c.exit_tokens].tolist()
        chunks = [pick[i:i + 256] for i in range(0, len(pick), 256)]
        ckpt = self.out / "ckpt_exit.pt"
        start = 0
        if ckpt.is_file():
            st = torch.load(ckpt, weights_only=False)
            head.load_state_dict(st["head"])
            opt.load_state_dict(st["opt"])
            start = st["chunk"]
        last_save = time.time()
        bar = tqdm(range(start, len(chunks)), desc="exit head", unit="chunk")
        for ci in bar:
            rows = [pos_list[j] for j in chunks[ci]]
            h = torch.stack([self.train_set[fi].hidden[self.le][t] for fi, t in rows]).float()
            ids = torch.stack([self.train_set[fi].top_ids[t] for fi, t in rows])
            p = torch.stack([self.train_set[fi].top_p[t] for fi, t in rows])
            hh = h + (h @ head.down) @ head.up
            logits = F.linear(self.t.norm(hh), self.t.lm_head.weight)
            loss = self._soft_ce(logits, ids, p, None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if time.time() - last_save > 60:
                torch.save({"head": head.state_dict(), "opt": opt.state_dict(), "chunk": ci + 1}, ckpt)
                last_save = time.time()
        self.exit_head = head.eval()
        save_artifact(str(self.out / "exit_head.safetensors"),
                      {f"exit_head.{n}": p for n, p in head.state_dict().items()}, {})

    # --- evaluation + artifact ---------------------------------------------------------------------
    @torch.no_grad()
    def write_report(self) -> None:
        from ..decoding.artifacts import read_artifact

        c = self.cfg
        rep: dict = {"config": asdict(c), "draft_layers": self.k, "exit_layer": self.le,
                     "corpus": self.state.get("corpus"), "vocab": self.state.get("vocab"),
                     "datastore": self.state.get("datastore")}
        tensors: dict = {}
        meta = {"target": target_fingerprint(self.t), "layers": self.k, "exit_layer": self.le,
                "vocab_trim": "vocab_trim.json" if self.trim is not None else None}
        W, lut = self._head()
        keep = self.trim.keep_ids if self.trim is not None else None
        if "adapter" in c.parts:
            t_ad, _ = read_artifact(str(self.out / "adapter.safetensors"))
            tensors.update(t_ad)
            adapter = make_adapter(self.t.cfg, self.k, c.adapter_ffn)
            adapter.load_state_dict({n[8:]: v for n, v in t_ad.items() if n.startswith("adapter.")})
            meta["adapter"] = {"ffn_dim": c.adapter_ffn}
            n_streams = c.streams if "streams" in c.parts else 0
            streams = None
            if n_streams:
                streams = StreamEmbeddings(n_streams, self.t.cfg.dim, 1, c.stream_rank)
                streams.load_state_dict({n[8:]: v for n, v in t_ad.items() if n.startswith("streams.")})
                meta["streams"] = {"n_streams": n_streams, "n_layers": 1, "rank": c.stream_rank}
            untrained = make_adapter(self.t.cfg, self.k, c.adapter_ffn)
            for name, ad, st in (("untrained", untrained, None), ("trained", adapter, streams)):
                agree = tot = 0
                s_agree = [0] * n_streams
                s_tot = [0] * n_streams
                for f in self.hold_set:
                    main, sl = self._draft_forward(ad.eval(), st, f, n_streams if st is not None else 0)
                    pred = main.argmax(-1) if keep is None else keep[main.argmax(-1)]
                    a = f.n_prompt - 1  # answer positions: the target's own greedy text
                    agree += int((pred[a:-1] == f.ids[a + 1:]).sum())
                    tot += len(f.ids) - 1 - a
                    if sl is not None:
                        for kk in range(1, n_streams + 1):
                            sp = sl[:, kk - 1].argmax(-1)
                            sp = sp if keep is None else keep[sp]
                            m = len(f.ids) - 1 - a - kk
                            if m > 0:
                                s_agree[kk - 1] += int((sp[a:a + m] == f.ids[a + 1 + kk:a + 1 + kk + m]).sum())
                                s_tot[kk - 1] += m
                rep[f"draft_top1_agreement_{name}"] = agree / max(tot, 1)
                if st is not None:
                    rep["stream_top1_agreement"] = [x / max(y, 1) for x, y in zip(s_agree, s_tot)]
        if "exit_head" in c.parts:
            t_ex, _ = read_artifact(str(self.out / "exit_head.safetensors"))
            tensors.update(t_ex)
            meta["exit_head"] = {"rank": c.exit_rank, "layer": self.le}
            head = ExitHead(self.t, c.exit_rank)
            head.load_state_dict({n[10:]: v for n, v in t_ex.items() if n.startswith("exit_head.")})
            for name, fn in (("untrained", self.t.head), ("trained", head)):
                mass = hit = tot = 0.0
                for f in self.hold_set:
                    h = f.hidden[self.le].float()
                    top8 = fn(h).topk(8, -1).indices  # [S, 8]
                    final = f.top_p.float()  # the target's top-K mass is where Omega lives
                    in_set = (f.top_ids[:, :, None] == top8[:, None, :]).any(-1)
                    mass += float((final * in_set).sum())
                    hit += float(in_set[:, 0].sum())
                    tot += len(f.ids)
                rep[f"omega8_{name}"] = mass / tot
                rep[f"exit_top8_hit_{name}"] = hit / tot
        save_artifact(str(self.out / "draft.safetensors"), tensors, meta)
        rep["timings_s"] = self.timings
        rep["artifact"] = str(self.out / "draft.safetensors")
        (self.out / "report.json").write_text(json.dumps(rep, indent=2))
        self.log("[train-draft] " + json.dumps({k: v for k, v in rep.items() if k != "config"}))
