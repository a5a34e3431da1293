"""`mirror generate`, the main job: the embedded distributed runtime by default (a local Ray,
target and draft actors, the gRPC token channel), `--inprocess` as the reference, and clear
errors with a non-zero exit for bad input."""
import json

import pytest

from mirror.cli import main
from mirror.decoding.factory import generate
from mirror.runtime.config import DeploymentConfig
from mirror.sampling import SamplingParams
from mirror.spec_config import SpecConfig

PROMPT = "What is the capital of France?"


def _reference(lm, model, n):
    """Plain greedy decoding of PROMPT on `model` (the target as the tested path runs it)."""
    ids = lm.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    return generate(model, lm.tokenizer, ids, SamplingParams(max_new_tokens=n), SpecConfig(method="ar"))


@pytest.mark.xdist_group("ray")  # starts the embedded Ray runtime
def test_generate_default_runs_the_embedded_runtime_and_is_exact(bundled, local_target, capsys):
    rc = main(["generate", PROMPT, "--max-new-tokens", "24", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ref = _reference(bundled, local_target, 24)
    assert out["runtime"] == "distributed" and out["degraded"] is None
    assert out["method"] == DeploymentConfig.local().speculative.method
    assert out["ids"] == ref.ids and "Paris" in out["text"]
    u = out["usage"]
    assert u["completion_tokens"] == len(ref.ids) and u["tokens_per_s"] > 0


def test_generate_inprocess_streams_text_then_a_stats_line(bundled, local_target, capsys):
    rc = main(["generate", PROMPT, "--max-new-tokens", "12", "--inprocess", "--method", "sd", "--draft", "ngram",
               "--threads", "1"])
    assert rc == 0
    cap = capsys.readouterr()
    ref = _reference(bundled, local_target, 12)
    assert cap.out.strip() == ref.text.strip()
    stats = cap.err.strip().splitlines()[-1]
    assert stats.startswith("[sd") and f"{len(ref.ids)} new tokens" in stats and "tok/s" in stats
    # target.backend auto: ONNX Runtime graphs where they apply (the onnx extra is installed here)
    on_onnx = getattr(local_target, "backend", "torch") == "onnx"
    assert ("target on ONNX Runtime" in stats) == on_onnx


def test_generate_inprocess_target_backend_torch_is_the_eager_model(bundled, capsys):
    rc = main(["generate", PROMPT, "--max-new-tokens", "12", "--inprocess", "--method", "ar", "--threads", "1",
               "--target-backend", "torch"])
    assert rc == 0
    cap = capsys.readouterr()
    assert cap.out.strip() == _reference(bundled, bundled.model, 12).text.strip()
    assert "ONNX Runtime" not in cap.err.strip().splitlines()[-1]


@pytest.mark.xdist_group("ray")  # starts the embedded Ray runtime
def test_generate_onnx_target_backend_embedded_and_inprocess_agree(bundled, capsys):
    """--target-backend onnx: the target actor runs ONNX Runtime graphs; Mirror-SD's output is
    the onnx target's own plain greedy decoding, through the embedded runtime and in-process."""
    from mirror.models.ort_target import OrtTarget

    ids = bundled.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    ref = generate(OrtTarget(bundled.model), bundled.tokenizer, ids, SamplingParams(max_new_tokens=20))
    rc = main(["generate", PROMPT, "--max-new-tokens", "20", "--json", "--target-backend", "onnx"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["runtime"] == "distributed" and out["method"] == "mirror" and out["degraded"] is None
    assert out["ids"] == ref.ids
    rc = main(["generate", PROMPT, "--max-new-tokens", "20", "--json", "--target-backend", "onnx", "--inprocess"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ids"] == ref.ids


@pytest.mark.parametrize("argv, message", [
    (["generate", "   "], "prompt is empty"),
    (["generate", "Hi", "--target-backend", "onnx", "--dtype", "bf16"], "runs fp32"),
    (["generate", "Hi", "--max-new-tokens", "0"], "max_new_tokens"),
    (["generate", "Hi", "--temperature", "-1"], "temperature"),
    (["generate", "Hi", "--method", "mirror", "--kappa", "0"], "kappa"),
    (["generate", "Hi", "--method", "sd", "--draft", "ngram", "--combine-min", "1"], "combine_min applies"),
    (["generate", "Hi", "--model", "/nonexistent/model.gguf"], "/nonexistent/model.gguf"),
])
def test_bad_input_exits_nonzero_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--inprocess"])
    assert e.value.code not in (0, None)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--prompts", "0"], "--prompts must be positive"),
    (["--skip", "-1"], "--skip must be >= 0"),
    (["--data", "/nonexistent/prompts.jsonl"], "no training prompts"),
    (["--model", "/nonexistent/model.gguf", "--data", "{prompts}"], "/nonexistent/model.gguf"),
])
def test_build_datastore_bad_input_exits_nonzero_with_a_message(argv, message, capsys, tmp_path):
    prompts = tmp_path / "prompts.jsonl"  # a valid prompt file, so the model is what is wrong
    prompts.write_text('{"prompt": "Name a colour."}\n')
    with pytest.raises(SystemExit) as e:
        main(["build-datastore", "--out", str(tmp_path / "ds")] + [a.format(prompts=prompts) for a in argv])
    assert e.value.code not in (0, None)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--layers", "0"], "--layers must be positive"),
    (["--epochs", "0"], "--epochs and --lr must be positive"),
    (["--answers", "/nonexistent/folder"], "no answers.jsonl"),
    (["--data", "/nonexistent/prompts.jsonl"], "no training prompts"),
    (["--data", "{prompts}", "--layers", "30"], "--layers must be in [1, 29]"),
])
def test_distill_draft_bad_input_exits_nonzero_with_a_message(argv, message, capsys, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Name a colour."}\n')
    with pytest.raises(SystemExit) as e:
        main(["distill-draft", "--out", str(tmp_path / "dd")] + [a.format(prompts=prompts) for a in argv])
    assert e.value.code not in (0, None)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--prompts", "0"], "--prompts must be positive"),
    (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
    (["--alpha", "1.5"], "--alpha must be in (0, 1]"),
    (["--data", "/nonexistent/prompts.jsonl"], "no training prompts"),
    (["--data", "{specbench}"], "training on the benchmark is not allowed"),
])
def test_calibrate_int8_bad_input_exits_nonzero_with_a_message(argv, message, capsys, tmp_path):
    bench = tmp_path / "question.jsonl"
    bench.write_text('{"question_id": 1, "category": "qa", "turns": ["Name a colour."]}\n')
    with pytest.raises(SystemExit) as e:
        main(["calibrate-int8", "--out", str(tmp_path / "c.safetensors")] + [a.format(specbench=bench) for a in argv])
    assert e.value.code not in (0, None)
    assert message in capsys.readouterr().err


def test_calibrate_int8_writes_statistics_the_draft_loads(bundled, capsys, tmp_path):
    from mirror.decoding.factory import load_draft_model
    from mirror.models.quant import QuantLinear, load_calibration

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Name a colour."}\n{"prompt": "Count to five."}\n')
    out = str(tmp_path / "c.safetensors")
    assert main(["calibrate-int8", "--data", str(prompts), "--prompts", "2", "--max-new-tokens", "4",
                 "--out", out]) == 0
    act, meta = load_calibration(out)
    assert meta["prompts"] == "2" and float(meta["alpha"]) == 0.85
    assert len(act) == 4 * bundled.model.cfg.n_layers + 1 and all(float(v.max()) > 0 for v in act.values())
    q = load_draft_model("target", bundled.model, "int8", out)
    assert isinstance(q.layers[0].w2, QuantLinear) and q.layers[0].ffn_norm is not bundled.model.layers[0].ffn_norm


def test_naming_another_draft_drops_the_defaults_draft_settings():
    """The embedded default tunes combine_min, the gguf model draft and one-row budgets for its
    n-gram + gguf draft; `--draft X` gets X's defaults for those (the n-gram: budget 48), not an
    invalid mix; flags given keep their values, and other flags keep the default's draft."""
    from argparse import Namespace

    from mirror.cli import spec_from_args

    base = DeploymentConfig.local().speculative
    ng = spec_from_args(Namespace(draft="ngram"), base)
    assert (ng.draft, ng.combine_min, ng.draft_quant, ng.draft_model, ng.pre_budget, ng.budget) == \
        ("ngram", 0.0, "none", None, 0, 48)
    assert ng.exit_head == base.exit_head and ng.method == base.method and ng.gamma == base.gamma
    assert spec_from_args(Namespace(draft="ngram", budget=4), base).budget == 4
    same = spec_from_args(Namespace(gamma=3), base)
    assert (same.draft, same.combine_min, same.budget, same.gamma) == (base.draft, base.combine_min, base.budget, 3)
