"""Token-channel round-trip latency on loopback (mirror/runtime/channel.py).

A trivial draft (fixed windows, no model) isolates what the channel itself costs per step:
  signal->ack      send_signal + the draft's Ready (Open.ack_signals): one hop each way
  verdict->window  send_verdict until the next DraftWindow arrives (what the target waits on)
  step             send_signal, then send_verdict -> window: the two messages of a Mirror step
With --gap-ms G the target side sleeps G ms before each round trip, as it would while its layers
run: both ends go idle between messages, as in a real step, and each hop pays a thread wake-up.

    .venv/bin/python -m benchmarks.channel_latency                  # draft server in a 2nd process
    .venv/bin/python -m benchmarks.channel_latency --inproc         # ... or in a thread of this one
    .venv/bin/python -m benchmarks.channel_latency --gamma 7 --kappa 8 --n 5000 --out runs/x.json
    .venv/bin/python -m benchmarks.channel_latency --gap-ms 40 --n 300   # idle between messages
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import time

import torch

from mirror.decoding.drafters.base import DraftStats
from mirror.decoding.messages import DraftWindow, EarlyExitSignal, Verdict
from mirror.runtime.channel import DraftChannelClient, DraftServer
from mirror.sampling import SamplingParams
from mirror.spec_config import SpecConfig


class _TrivialDrafter:
    def __init__(self):
        self.stats = DraftStats()

    def totals(self) -> DraftStats:
        return self.stats

    def close(self) -> None:
        pass


class TrivialPipeline:
    """Answers at once: windows of `gamma` fixed ids, no branch work."""

    def __init__(self, req):
        self.drafter = _TrivialDrafter()

    def start(self, ctx, gamma):
        return DraftWindow(list(range(100, 100 + gamma)))

    def warm(self, prompt):
        pass

    def prepare(self, should_stop=None):
        return 0

    def on_signal(self, signal, should_stop=None):
        return 0

    def on_verdict(self, verdict, gamma):
        return DraftWindow(list(range(verdict.token, verdict.token + gamma)))


def _serve(port_queue, threads: int) -> None:
    torch.set_num_threads(threads)
    srv = DraftServer(TrivialPipeline).start()
    port_queue.put(srv.port)
    srv.server.wait_for_termination()


def _summary(xs_ns: list[int]) -> dict:
    ms = sorted(x / 1e6 for x in xs_ns)
    q = lambda p: ms[min(len(ms) - 1, int(p * len(ms)))]  # noqa: E731
    return {"n": len(ms), "p50_ms": q(0.50), "p90_ms": q(0.90), "p99_ms": q(0.99),
            "mean_ms": statistics.fmean(ms), "max_ms": ms[-1]}


def measure(address: str, n: int, warmup: int, gamma: int, kappa: int, vocab: int = 49152,
            gap_ms: float = 0.0) -> dict:
    spec = SpecConfig(method="mirror", gamma=gamma, kappa=kappa)
    params = SamplingParams(max_new_tokens=1 << 20)
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(gamma + 1, vocab, generator=g).log_softmax(-1)
    top = logp.topk(kappa, -1)  # [gamma+1, kappa]
    out = {}
    with DraftChannelClient(address) as client:
        for name in ("signal->ack", "verdict->window", "step"):
            client.open(list(range(64)), 1, gamma, spec, params, ack_signals=name == "signal->ack")
            xs = []
            for i in range(warmup + n):
                sig = EarlyExitSignal(i, top.indices, top.values)
                if gap_ms:
                    time.sleep(gap_ms / 1e3)
                t0 = time.perf_counter_ns()
                if name == "signal->ack":
                    client.send_signal(sig)
                    client.wait_ready()
                elif name == "verdict->window":
                    w = client.send_verdict(Verdict(i, 2, 7), gamma)
                else:
                    client.send_signal(sig)
                    w = client.send_verdict(Verdict(i, 2, 7), gamma)
                t1 = time.perf_counter_ns()
                if i >= warmup:
                    xs.append(t1 - t0)
            if name != "signal->ack":
                assert len(w.ids) == gamma
            client.close()
            out[name] = _summary(xs)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=2000, help="round trips per mode")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--gap-ms", type=float, default=0.0, help="idle ms before each round trip (the target's layers)")
    p.add_argument("--gamma", type=int, default=5)
    p.add_argument("--kappa", type=int, default=8)
    p.add_argument("--inproc", action="store_true", help="draft server in a thread of this process")
    p.add_argument("--threads", type=int, default=1, help="torch threads on each side")
    p.add_argument("--out", default="runs/channel_latency.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    proc = srv = None
    if args.inproc:
        srv = DraftServer(TrivialPipeline).start()
        address = srv.address
    else:
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        proc = ctx.Process(target=_serve, args=(q, args.threads), daemon=True)
        proc.start()
        address = f"127.0.0.1:{q.get(timeout=60)}"
    try:
        res = measure(address, args.n, args.warmup, args.gamma, args.kappa, gap_ms=args.gap_ms)
    finally:
        if srv is not None:
            srv.stop()
        if proc is not None:
            proc.terminate()
            proc.join(5)
    report = {"benchmark": "channel_latency", "server": "thread" if args.inproc else "process",
              "gamma": args.gamma, "kappa": args.kappa, "signal_numbers": 2 * (args.gamma + 1) * args.kappa,
              "window_ids": args.gamma, "n": args.n, "gap_ms": args.gap_ms, "cpus": os.cpu_count(),
              "python": platform.python_version(),
              "results": res}
    for name, r in res.items():
        print(f"{name:>16}: p50 {r['p50_ms']:.3f} ms  p90 {r['p90_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms  "
              f"mean {r['mean_ms']:.3f} ms  (n={r['n']})")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
