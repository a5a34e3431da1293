"""Tensor parallel 2 on CPU (gloo) gives bitwise the same logits and the same tokens as 1."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import tiny_model


# Starts Ray (or torch.distributed) and pins workers to cores: these tests share one pytest-xdist
# worker (see conftest.py), so two of them never run at once.
pytestmark = pytest.mark.xdist_group("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, bundled, q):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from mirror.decoding.factory import generate
    from mirror.models import load_model
    from mirror.runtime.tensor_parallel import TPDriver, follow, shard_model
    from mirror.sampling import SamplingParams
    from mirror.spec_config import SpecConfig

    if bundled:
        lm = load_model()
        model, tok = lm.model, lm.tokenizer
        prompt = tok.encode_chat([{"role": "user", "content": "Name three rivers in Europe."}])
    else:
        from helpers import byte_tokenizer

        model, tok = tiny_model("tiny-qwen2", seed=4), byte_tokenizer()
        prompt = list(range(10, 30))
    shard_model(model, rank, world)
    if rank != 0:
        follow(model)
        dist.destroy_process_group()
        return
    drv = TPDriver(model)
    params = SamplingParams(max_new_tokens=32, ignore_eos=True)
    out = {}
    for name, spec in (("ar", None), ("mirror", SpecConfig(method="mirror", draft="ngram", exit_layer=2 if not bundled else 20))):
        out[name] = generate(drv, tok, prompt, params, spec).ids
        drv.release()
    c = drv.new_cache(1, 64)
    out["logits"] = drv(torch.tensor([prompt]), torch.arange(len(prompt))[None], c).numpy()  # by value
    drv.stop()
    dist.destroy_process_group()
    q.put(out)


def _run_tp(world, bundled):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, bundled, q)) for r in range(world)]
    for p in procs:
        p.start()
    out = q.get(timeout=600)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return out


def test_tp2_equals_tp1_tiny():
    tp1 = _run_tp(1, bundled=False)
    tp2 = _run_tp(2, bundled=False)
    assert (tp1["logits"] == tp2["logits"]).all()
    assert tp1["ar"] == tp2["ar"] and tp1["mirror"] == tp2["mirror"]


def test_tp2_equals_tp1_bundled():
    tp1 = _run_tp(1, bundled=True)
    tp2 = _run_tp(2, bundled=True)
    assert (tp1["logits"] == tp2["logits"]).all()
    assert tp1["ar"] == tp2["ar"] == tp2["mirror"]
