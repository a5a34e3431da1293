"""`mirror train-draft` (mirror/training/train_draft.py) end to end on a tiny target: every phase
runs, the artifact loads and drafts losslessly, a finished run resumes as a no-op, and a folder
holding another configuration is refused."""
import json

import pytest
import torch

from mirror.decoding.artifacts import load_draft_artifact, load_exit_head
from mirror.decoding.factory import generate
from mirror.sampling import SamplingParams
from mirror.spec_config import SpecConfig
from mirror.training.train_draft import TrainConfig, Trainer

from helpers import byte_tokenizer, tiny_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("train_draft")
    data = d / "p.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"prompt {i}: " + "xyz " * (i + 2)}) for i in range(10)))
    cfg = dict(data=str(data), out=str(d / "out"), draft_layers=2, adapter_ffn=32, exit_layer=3, prompts=8,
               max_new_tokens=8, gen_batch=4, top_k=4, vocab_size=64, streams=2, exit_rank=4, exit_tokens=64,
               epochs=2, accum=2)
    model, tok = tiny_model(), byte_tokenizer()
    logs = []
    report = Trainer(model, tok, TrainConfig(**cfg), log=logs.append).run()
    return model, tok, d, cfg, report, logs


def test_train_draft_produces_a_working_artifact(trained):
    model, tok, d, cfg, report, _ = trained
    assert report["corpus"]["sequences"] == 8
    assert report["vocab"]["size"] in (64, 65)  # the 64 most frequent, plus eos when it is not among them
    assert set(report["timings_s"]) == {"corpus", "vocab", "adapter", "exit"}
    art = load_draft_artifact(report["artifact"], model)
    assert art.layers == 2 and art.streams is not None
    assert float(art.adapter.wo.weight.abs().sum()) > 0  # trained away from its identity init
    head = load_exit_head(report["artifact"], model)
    assert float(head.up.abs().sum()) > 0
    prompt = tok.encode("prompt 3: xyz xyz")
    params = SamplingParams(max_new_tokens=16)
    plain = generate(model, tok, prompt, params)
    for draft in ("self", "streaming"):
        spec = SpecConfig(method="mirror", draft=draft, adapter=report["artifact"], exit_head=report["artifact"],
                          exit_layer=3, gamma=3, streams=2)
        assert generate(model, tok, prompt, params, spec).ids == plain.ids


def test_train_draft_resumes_and_refuses_other_settings(trained):
    model, tok, d, cfg, report, _ = trained
    logs = []
    again = Trainer(model, tok, TrainConfig(**cfg), log=logs.append).run()
    assert sum("done earlier, skipped" in line for line in logs) == 5  # corpus, vocab, adapter, exit, report
    assert again["omega8_trained"] == report["omega8_trained"]
    with pytest.raises(ValueError, match="different configuration"):
        Trainer(model, tok, TrainConfig(**{**cfg, "epochs": 3}))


def test_train_config_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="unknown parts"):
        TrainConfig(data="x", out=str(tmp_path), parts=["adapter", "nope"])
    with pytest.raises(ValueError, match="prompts must be positive"):
        TrainConfig(data="x", out=str(tmp_path), prompts=0)
    with pytest.raises(ValueError, match="include 'adapter'"):
        TrainConfig(data="x", out=str(tmp_path), parts=["streams"])
