"""The benchmark harness: `mirror bench`, Spec-Bench arithmetic, MT-Bench turns, the tracer and
timeline, peers, and the exit profile. End-to-end tests use the real bundled model on tiny
question files (16 new tokens) so the whole file stays well under a few minutes."""
import json
import statistics
import sys

import pytest

from benchmarks import bench
from benchmarks.exit_profile import expected_tau, fit_alpha, profile, write_profile
from mirror import trace
from mirror.cli import main
from mirror.decoding.factory import generate
from mirror.sampling import SamplingParams
from mirror.spec_config import SpecConfig

QUESTIONS = [
    {"question_id": 1, "category": "qa", "turns": ["What is the capital of France? Answer in one sentence."]},
    {"question_id": 2, "category": "translation",
     "turns": ["Translate German-to-English: Der Hund schläft im Garten, weil es warm ist."]},
]
MT = {"question_id": 81, "category": "writing",
      "turns": ["Write one sentence about a cat.", "Now rewrite your sentence about a dog."]}


def write_questions(path, qs):
    path.write_text("".join(json.dumps(q) + "\n" for q in qs))
    return str(path)


@pytest.fixture
def cli_model(bundled, monkeypatch):
    """`mirror bench` through the real CLI, with the session's loaded model (loading is tested
    elsewhere and takes seconds)."""
    import mirror.models

    monkeypatch.setattr(mirror.models, "load_model", lambda *a, **k: bundled)
    return bundled


# --- end to end ------------------------------------------------------------------------------
def test_bench_cli_results_identical_outputs_and_speedup_arithmetic(cli_model, tmp_path, capsys):
    qfile = write_questions(tmp_path / "q.jsonl", QUESTIONS)
    out = tmp_path / "out"
    rc = main(["bench", "--questions", qfile, "--methods", "ar", "sd:ngram", "mirror:ngram",
               "--max-new-tokens", "16", "--out", str(out), "--threads", "1", "--warmup", "0",
               "--no-progress"])
    assert rc == 0
    for name in ("results.json", "results.md", "speedup.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((out / "results.json").read_text())
    labels = ["ar", "sd:ngram", "mirror:ngram"]
    assert res["config"]["methods"] == labels
    assert res["config"]["specs"]["mirror:ngram"]["method"] == "mirror"
    assert res["config"]["specs"]["mirror:ngram"]["draft"] == "ngram"
    qs = res["questions"]
    assert [q["category"] for q in qs] == ["qa", "translation"]
    summary = res["summary"]
    assert set(summary) == {"qa", "translation", "overall"}
    for lb in labels:
        assert summary["overall"][lb]["identical"] == len(QUESTIONS)  # greedy: lossless
    # Spec-Bench's speedup: mean per-question tok/s over the baseline's mean, same run
    for cat, rows in summary.items():
        sel = [q for q in qs if cat == "overall" or q["category"] == cat]
        base = statistics.fmean(q["methods"]["ar"]["tok_s"] for q in sel)
        for lb in labels:
            for q in sel:
                m = q["methods"][lb]
                toks = sum(t["new_tokens"] for t in m["turns"])
                wall = sum(t["wall_s"] for t in m["turns"])
                assert m["tok_s"] == pytest.approx(toks / wall)
                assert wall >= sum(t["metrics"]["prefill_s"] + t["metrics"]["decode_s"] for t in m["turns"])
            mean = statistics.fmean(q["methods"][lb]["tok_s"] for q in sel)
            assert rows[lb]["tok_s"] == pytest.approx(mean)
            assert rows[lb]["speedup"] == pytest.approx(mean / base)
    assert summary["overall"]["ar"]["speedup"] == pytest.approx(1.0)
    assert summary["overall"]["mirror:ngram"]["hit_rate"] is not None
    md = (out / "results.md").read_text()
    assert "| mirror:ngram |" in md and "overall" in md
    assert "results.json" in capsys.readouterr().out


def test_resume_keeps_the_journaled_questions_and_runs_the_rest(cli_model, tmp_path, capsys):
    """An interrupted run leaves OUT/records.jsonl; `--resume` keeps its questions (same records,
    same times) and runs only the missing ones; a journal of other settings is refused."""
    qfile = write_questions(tmp_path / "q.jsonl", QUESTIONS)
    out = tmp_path / "out"
    args = ["bench", "--questions", qfile, "--methods", "ar", "sd:ngram", "--max-new-tokens", "8",
            "--out", str(out), "--threads", "1", "--warmup", "0", "--no-progress"]
    assert main(args) == 0
    journal = out / bench.JOURNAL
    lines = journal.read_text().splitlines()
    assert len(lines) == 1 + len(QUESTIONS)  # header + one record per question
    first = json.loads(lines[1])
    journal.write_text("\n".join(lines[:2]) + "\n")  # as if stopped after the first question
    assert main(args + ["--resume"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [q["question_id"] for q in res["questions"]] == [1, 2]
    assert res["questions"][0] == first  # kept, not rerun
    assert res["config"]["resumed_questions"] == 1
    assert res["config"]["questions_s"] == pytest.approx(sum(q["bench_s"] for q in res["questions"]))
    assert res["summary"]["overall"]["sd:ngram"]["identical"] == len(QUESTIONS)
    assert len(journal.read_text().splitlines()) == 1 + len(QUESTIONS)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # other settings: refused, journal untouched
        main([a if a != "8" else "4" for a in args] + ["--resume"])  # --max-new-tokens 4
    assert e.value.code != 0
    assert "max_new_tokens" in capsys.readouterr().err
    assert len(journal.read_text().splitlines()) == 1 + len(QUESTIONS)


def test_journal_that_does_not_match_the_questions_is_refused(tmp_path):
    config = {"methods": ["ar"], "max_new_tokens": 8}
    path = tmp_path / bench.JOURNAL
    rec = {"question_id": 7, "category": "qa", "methods": {}}
    path.write_text(json.dumps({"run": bench.run_key(config)}) + "\n" + json.dumps(rec) + "\n")
    with pytest.raises(ValueError, match="does not match"):
        bench.load_journal(str(path), config, QUESTIONS)
    assert bench.load_journal(str(path), config, [{"question_id": 7}]) == [rec]
    with open(path, "a") as f:  # a record whose write was cut by the stop: dropped, runs again
        f.write(json.dumps(rec)[:20])
    assert bench.load_journal(str(path), config, [{"question_id": 7}]) == [rec]
    path.write_text(json.dumps(rec) + "\n")
    with pytest.raises(ValueError, match="not a mirror bench journal"):
        bench.load_journal(str(path), config, QUESTIONS)


def test_missing_question_file_exits_nonzero_naming_spec_bench(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--questions", str(tmp_path / "absent.jsonl")])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "absent.jsonl" in err and "github.com/hemingkx/Spec-Bench" in err and "question.jsonl" in err


@pytest.mark.xdist_group("ray")  # starts the embedded Ray runtime
def test_bench_on_the_distributed_runtime_matches_in_process(cli_model, local_target, tmp_path):
    """`--runtime distributed`: the embedded Ray runtime (target and draft actors, gRPC channel)
    runs every method on the deployment's target backend (auto, recorded in the results);
    greedy outputs equal the in-process reference on that backend and no request degraded."""
    qfile = write_questions(tmp_path / "q.jsonl", QUESTIONS[:1])
    out = tmp_path / "out"
    rc = main(["bench", "--questions", qfile, "--methods", "ar", "mirror:ngram", "--max-new-tokens", "12",
               "--out", str(out), "--threads", "1", "--warmup", "0", "--no-progress", "--runtime", "distributed"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["runtime"] == "distributed"
    assert res["config"]["target_backend"] == getattr(local_target, "backend", "torch")
    assert f"target backend: {res['config']['target_backend']}" in (out / "results.md").read_text()
    assert res["summary"]["overall"]["mirror:ngram"]["identical"] == 1
    q = res["questions"][0]
    prompt = bench.chat_ids(cli_model.tokenizer, [{"role": "user", "content": QUESTIONS[0]["turns"][0]}])
    ref = generate(local_target, cli_model.tokenizer, prompt, SamplingParams(max_new_tokens=12),
                   SpecConfig(method="ar"))
    for lb in ("ar", "mirror:ngram"):
        turn = q["methods"][lb]["turns"][0]
        assert turn["ids_sha1"] == bench.ids_hash(ref.ids) and turn["new_tokens"] == len(ref.ids)
        assert not turn["metrics"]["extra"].get("degraded")
    assert q["methods"]["mirror:ngram"]["turns"][0]["metrics"]["target_steps"] < len(ref.ids)


# --- MT-Bench two turns ----------------------------------------------------------------------
class RecordingEngine(bench.InProcessEngine):
    def __init__(self, lm):
        super().__init__(lm)
        self.prompts = []

    def generate(self, prompt_ids, params, spec):
        self.prompts.append(list(prompt_ids))
        return super().generate(prompt_ids, params, spec)


def test_mt_bench_second_turn_holds_the_models_own_first_answer(bundled):
    tok = bundled.tokenizer
    eng = RecordingEngine(bundled)
    method = bench.Method("mirror:ngram", SpecConfig(method="mirror", draft="ngram"), eng)
    turns, outs = bench.run_turns(method, tok, MT["turns"], SamplingParams(max_new_tokens=12))
    assert len(turns) == len(eng.prompts) == 2
    first_answer = tok.decode(outs[0], skip_special_tokens=True).strip()
    assert first_answer and turns[0]["text"].strip() == first_answer
    second = tok.decode(eng.prompts[1])
    assert MT["turns"][0] in second and first_answer in second and MT["turns"][1] in second
    # the second prompt is the chat template over the 2-turn conversation
    assert eng.prompts[1] == tok.encode_chat([
        {"role": "user", "content": MT["turns"][0]}, {"role": "assistant", "content": first_answer},
        {"role": "user", "content": MT["turns"][1]}])
    rec = bench.question_record(turns, True)
    assert rec["new_tokens"] == len(outs[0]) + len(outs[1])
    assert rec["wall_s"] == pytest.approx(turns[0]["wall_s"] + turns[1]["wall_s"])


# --- pure parts ------------------------------------------------------------------------------
def test_method_backend_splits_target_backend_off_labels():
    assert bench.method_backend("ar@target_backend=onnx") == ("ar", "onnx")
    assert bench.method_backend("mirror:ngram@gamma=3,target_backend=onnx,kappa=2") == ("mirror:ngram@gamma=3,kappa=2",
                                                                                    "onnx")
    assert bench.method_backend("sd:ngram@gamma=3") == ("sd:ngram@gamma=3", "torch")
    with pytest.raises(ValueError, match="target_backend must be one of"):
        bench.method_backend("ar@target_backend=tpu")
    label, spec = bench.parse_method("mirror:ngram@gamma=3,target_backend=onnx", {})
    assert label == "mirror:ngram@gamma=3,target_backend=onnx" and spec.gamma == 3
    assert bench.parse_method("ar@target_backend=onnx", {}) == ("ar@target_backend=onnx", None)
    labels = ["ar", "mirror:ngram", "ar@target_backend=onnx", "mirror:ngram@target_backend=onnx"]
    assert bench.reference_label("mirror:ngram@target_backend=onnx", labels) == "ar@target_backend=onnx"
    assert bench.reference_label("mirror:ngram", labels) == "ar"
    assert bench.reference_label("mirror:ngram@target_backend=onnx", labels[:2]) == "ar"


def test_parse_method():
    label, spec = bench.parse_method("mirror:ngram+self@gamma=3,kappa=4", {"gamma": 7, "budget": 4})
    assert label == "mirror:ngram+self@gamma=3,kappa=4"
    assert (spec.method, spec.draft, spec.gamma, spec.kappa, spec.budget) == ("mirror", "ngram+self", 3, 4, 4)
    assert bench.parse_method("ar", {"gamma": 3}) == ("ar", None)
    with pytest.raises(ValueError):
        bench.parse_method("warp:ngram", {})
    with pytest.raises(ValueError):
        bench.parse_method("sd:ngram@gamma", {})


def test_legend_label_wraps_long_specs_at_commas_and_keeps_every_character():
    long = "mirror:ngram+model@" + ",".join(f"setting_{i}=value_{i}" for i in range(12))
    wrapped = bench.legend_label(long, width=60)
    lines = wrapped.split("\n")
    assert len(lines) > 1 and all(len(ln) <= 60 for ln in lines)
    assert all(ln.endswith(",") for ln in lines[:-1])  # broken after a comma, never inside a setting
    assert "".join(lines) == long
    assert bench.legend_label("sd:ngram") == "sd:ngram"


def test_alpha_fit_inverts_expected_tau():
    for a in (0.0, 0.3, 0.8):
        assert fit_alpha(expected_tau(a, 5), 5) == pytest.approx(a, abs=1e-6)
    assert expected_tau(1.0, 4) == 5


# --- trace and timeline ----------------------------------------------------------------------
def test_tracer_off_records_nothing_and_costs_a_noop():
    assert not trace.enabled()
    assert trace.span("x") is trace.span("y")  # the shared no-op
    with trace.recording() as rec:
        with trace.span("a", "target", step=1):
            trace.instant("b", "channel")
    assert sorted(e["name"] for e in rec.events) == ["a", "b"]
    assert not trace.enabled()


def test_mirror_trace_is_chrome_format_with_pipeline_spans(cli_model, tmp_path, capsys):
    path = tmp_path / "trace.json"
    rc = main(["generate", "Write a haiku about the sea.", "--method", "mirror", "--draft", "ngram+self",
               "--draft-layers", "2", "--max-new-tokens", "16", "--threads", "1", "--trace", str(path)])
    assert rc == 0
    events = json.loads(path.read_text())["traceEvents"]
    assert isinstance(events, list) and events
    for e in events:
        assert {"ph", "ts", "pid", "tid", "name"} <= set(e)
        assert e["ph"] in ("X", "i", "M")
        if e["ph"] == "X":
            assert e["dur"] >= 0
    names = {e["name"] for e in events if e["ph"] != "M"}
    assert {"target.start", "target.prefix", "target.suffix", "draft.on_signal", "draft.start",
            "channel.send_signal", "channel.send_verdict", "request"} <= names
    pre = [e for e in events if e["name"] == "target.prefix"]
    assert [e["args"]["step"] for e in pre] == list(range(len(pre)))
    lanes = {e["args"]["name"].split(" ")[0] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {"target", "draft", "channel"} <= lanes
    png = tmp_path / "trace.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class DegradingEngine(bench.InProcessEngine):
    """In-process, but every speculative request reports what the distributed runtime reports
    when its draft worker fails: `degraded` (the target finished alone)."""

    def generate(self, prompt_ids, params, spec):
        res = super().generate(prompt_ids, params, spec)
        if spec is not None and spec.method != "ar":
            res.metrics.extra["degraded"] = "open: ConnectionError: draft worker down"
        return res


def test_bench_flags_methods_whose_draft_failed(cli_model, tmp_path, capsys, monkeypatch):
    """A method whose requests ran without their draft still gives the target's output, so only
    its speed is wrong: the summary counts those questions, results.md carries a warning and the
    CLI warns on stderr and exits 1 instead of passing the figures off as a measurement."""
    monkeypatch.setitem(bench.ENGINES, "degrading", DegradingEngine)
    qfile = write_questions(tmp_path / "q.jsonl", QUESTIONS[:1])
    out = tmp_path / "out"
    rc = main(["bench", "--questions", qfile, "--methods", "ar", "sd:ngram", "--max-new-tokens", "8",
               "--out", str(out), "--threads", "1", "--warmup", "0", "--no-progress", "--runtime", "degrading"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "sd:ngram: 1 of 1 questions ran without their draft" in err and "draft worker down" in err
    res = json.loads((out / "results.json").read_text())
    assert res["summary"]["overall"]["sd:ngram"]["degraded"] == 1
    assert res["summary"]["overall"]["ar"]["degraded"] == 0
    assert res["summary"]["overall"]["sd:ngram"]["identical"] == 1  # the output is still the target's
    md = (out / "results.md").read_text()
    assert "## Warning: the draft failed" in md and "- sd:ngram: 1 of 1 questions" in md


# --- peers -----------------------------------------------------------------------------------
def test_peers_without_transformers_say_how_to_install(bundled, monkeypatch):
    from benchmarks.peers import PeersUnavailable, peer_methods

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(PeersUnavailable, match="pip install"):
        peer_methods(bundled)


def test_peers_run_side_by_side(bundled):
    pytest.importorskip("transformers", reason="peers need the optional extra: pip install 'mirror-sd[peers]'")
    from benchmarks.peers import peer_methods

    peers = peer_methods(bundled, draft_layers=2)
    assert [m.label for m in peers] == ["hf:plain", "hf:pld", "hf:assisted"]
    methods = [bench.Method("ar", None, bench.InProcessEngine(bundled))] + peers
    recs = bench.run_bench(methods, bundled.tokenizer, QUESTIONS[:1], SamplingParams(max_new_tokens=8),
                           warmup=0, progress=False)
    row = recs[0]["methods"]
    assert all(isinstance(row[m.label]["identical_to_ar"], bool) for m in peers)
    assert all(row[m.label]["new_tokens"] > 0 and row[m.label]["decode_tok_s"] is None for m in peers)
    s = bench.summarize(recs, [m.label for m in methods])
    assert s["overall"]["hf:plain"]["speedup"] > 0


def test_peers_assisted_with_a_given_draft_model(bundled, tmp_path):
    """hf:assisted with a Hugging Face folder as its draft (what distill-draft writes): greedy
    assisted generation keeps the target's output; a draft of another vocabulary is refused."""
    pytest.importorskip("transformers", reason="peers need the optional extra: pip install 'mirror-sd[peers]'")
    from benchmarks.peers import PeersUnavailable, peer_methods
    from mirror.models import save_hf
    from mirror.models.llama import Transformer

    from helpers import tiny_model

    t = bundled.model
    small = Transformer(t.cfg.with_(n_layers=3))
    small.load_state_dict({k: v for k, v in t.state_dict().items()
                           if not k.startswith("layers.") or int(k.split(".")[1]) < 3}, strict=False)
    save_hf(small.prepare(), str(tmp_path / "draft"))
    peers = peer_methods(bundled, draft_model=str(tmp_path / "draft"))
    assisted = next(m for m in peers if m.label == "hf:assisted")
    assert assisted.engine.peers.draft.config.num_hidden_layers == 3
    methods = [bench.Method("ar", None, bench.InProcessEngine(bundled)), assisted]
    recs = bench.run_bench(methods, bundled.tokenizer, QUESTIONS[:1], SamplingParams(max_new_tokens=12),
                           warmup=0, progress=False)
    assert recs[0]["methods"]["hf:assisted"]["new_tokens"] > 0
    save_hf(tiny_model("tiny"), str(tmp_path / "other"))
    with pytest.raises(PeersUnavailable, match="vocab"):
        peer_methods(bundled, draft_model=str(tmp_path / "other"))
    with pytest.raises(PeersUnavailable, match="cannot load"):
        peer_methods(bundled, draft_model=str(tmp_path / "missing"))


# --- exit profile ----------------------------------------------------------------------------
def test_exit_profile_omega_bounds_monotone_and_last_layer(bundled, tmp_path):
    from mirror.decoding.ar import generate_ar

    from benchmarks.exit_profile import omega_on_prompt

    n = bundled.model.cfg.n_layers
    spec = SpecConfig(method="mirror", draft="ngram", gamma=3, kappa=4)
    prof = profile(bundled, QUESTIONS, max_new_tokens=12, spec=spec, layers=[n // 2, (2 * n) // 3, n],
                   kappas=(1, 2, 4, 8, 16), gammas=(3,), reps=1, progress=False)
    layers, kappas = prof["config"]["layers"], prof["config"]["kappas"]
    assert layers[-1] == n and kappas == [1, 2, 4, 8, 16]
    for key in ("omega", "top1_hit"):
        for row in prof[key]:
            assert all(0.0 <= v <= 1.0 + 1e-9 for v in row)
            assert all(a <= b + 1e-9 for a, b in zip(row, row[1:]))  # non-decreasing in kappa
    assert prof["top1_hit"][-1] == pytest.approx([1.0] * len(kappas))  # layer N: the final head
    assert prof["omega"][-1][0] < 1.0  # mass is q's, not a hit count
    assert prof["config"]["positions"] > 0
    rec = prof["recommended"]
    assert rec["exit_layer"] < n and rec["kappa"] in kappas and rec["gamma"] == 3
    assert prof["at_spec"]["expected_step_s"] >= prof["at_spec"]["T_M_s"] > 0
    assert prof["measured"]["target_steps"] > 0
    paths = write_profile(prof, str(tmp_path))
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "kappa=16" in open(paths["md"]).read()
    # the instrumented decode is plain greedy decoding
    tok = bundled.tokenizer
    p = tok.encode_chat([{"role": "user", "content": QUESTIONS[0]["turns"][0]}])
    ids, *_ = omega_on_prompt(bundled.model, p, 12, [n // 2], [1], set(tok.eos_ids))
    ref = generate_ar(bundled.model, tok, p, SamplingParams(max_new_tokens=12)).ids
    assert ids[:len(ref)] == ref


# --- runtime overlap arithmetic ----------------------------------------------------------------
def test_overlap_summary_arithmetic():
    """benchmarks.runtime_overlap.summarise on two hand-made requests: per-step means, the hidden
    fraction (draft work done under the target's prefix/suffix over all draft work), the channel
    share, and the pre-signal hit rate."""
    from benchmarks.runtime_overlap import summarise

    def req(steps, tokens, hits, misses, pre_hits, pre_branches, taken):
        return {"target_steps": steps, "new_tokens": tokens, "hits": hits, "misses": misses, "decode_s": 1.0,
                "extra": {"timing": {"prefix_s": 0.5, "suffix_s": 0.3, "signal_s": 0.01, "window_s": 0.05},
                          "draft_timing": {"expand_s": 0.3, "overrun_s": 0.02, "verdict_s": 0.03, "prepare_s": 0.1},
                          "pre_branches": pre_branches, "pre_hits": pre_hits, **({"taken": taken} if taken else {})}}

    s = summarise([req(10, 21, 6, 3, 2, 40, 5), req(10, 21, 3, 6, 1, 40, 0)])
    assert s["steps"] == 20 and s["tau"] == pytest.approx(2.0)
    assert s["hit_rate"] == pytest.approx(0.5) and s["pre_hit_rate"] == pytest.approx(3 / 18)
    assert s["taken_rate"] == pytest.approx(5 / 18)
    assert s["pre_branches_per_step"] == pytest.approx(4.0)
    assert s["per_step_ms"]["prefix_s"] == pytest.approx(50.0)
    assert s["hidden_fraction"] == pytest.approx((0.2 + 0.6 - 0.04) / (0.2 + 0.6 + 0.06))
    exposed = 0.04 + 0.06
    assert s["channel_share_of_step"] == pytest.approx((0.1 - exposed + 0.02) / 2.0)


def test_channel_latency_times_each_round_trip_kind_on_a_real_server():
    from benchmarks.channel_latency import TrivialPipeline, measure
    from mirror.runtime.channel import DraftServer

    with DraftServer(TrivialPipeline) as srv:
        res = measure(srv.address, n=5, warmup=1, gamma=3, kappa=2, gap_ms=2.0)
    assert set(res) == {"signal->ack", "verdict->window", "step"}
    for r in res.values():
        assert r["n"] == 5 and 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"] < 2000


def test_peer_modes_pick_some_and_refuse_unknown(bundled, tmp_path, capsys):
    """--peer-modes runs only the named peers (no assisted draft is built when it is not asked
    for); an unknown mode is a CLI error, not a traceback."""
    pytest.importorskip("transformers", reason="peers need the optional extra: pip install 'mirror-sd[peers]'")
    from benchmarks.peers import peer_methods

    peers = peer_methods(bundled, modes=["pld", "plain"])
    assert [m.label for m in peers] == ["hf:pld", "hf:plain"]
    assert peers[0].engine.peers.draft is None
    with pytest.raises(ValueError, match="unknown peer mode"):
        peer_methods(bundled, modes=["medusa"])
    qfile = write_questions(tmp_path / "q.jsonl", QUESTIONS[:1])
    with pytest.raises(SystemExit) as e:
        main(["bench", "--questions", qfile, "--peers", "--peer-modes", "medusa", "--out", str(tmp_path / "o"),
              "--max-new-tokens", "2"])
    assert e.value.code != 0
    assert "unknown peer mode" in capsys.readouterr().err


def test_draft_cost_from_a_bench_run_divides_draft_time_by_drafted_tokens(tmp_path):
    """benchmarks.draft_cost --from-bench: per sd method, the window wait (the draft's serial work
    in one process) per drafted token over the mean verification step, summed over turns."""
    from benchmarks.draft_cost import from_bench

    def turn(window_s, first_s, verify_s, drafted, steps, accepted, by_source):
        return {"metrics": {"drafted_tokens": drafted, "target_steps": steps, "accepted_tokens": accepted,
                            "extra": {"timing": {"window_s": window_s, "first_window_s": first_s,
                                                 "verify_s": verify_s},
                                      "windows_by_source": by_source}}}

    label = "sd:ngram+model@combine_min=0.5"
    res = {"config": {"runtime": "inprocess"}, "questions": [
        {"methods": {"ar": {"turns": []}, label: {"turns": [turn(0.5, 0.1, 2.0, 40, 20, 30, {"ngram": 15, "model": 5})]}}},
        {"methods": {label: {"turns": [turn(0.3, 0.1, 1.0, 20, 10, 20, {"ngram": 10})]}}}]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(res))
    out = from_bench(str(path))
    assert list(out) == [label]
    r = out[label]
    assert r["draft_ms_per_token"] == pytest.approx(1e3 * 1.0 / 60)
    assert r["target_step_ms"] == pytest.approx(1e3 * 3.0 / 30)
    assert r["ratio_to_target_step"] == pytest.approx((1.0 / 60) / (3.0 / 30))
    assert r["tau"] == pytest.approx(1 + 50 / 30)
    assert r["windows_by_source"] == {"ngram": 25, "model": 5}
    res["config"]["runtime"] = "distributed"
    path.write_text(json.dumps(res))
    with pytest.raises(SystemExit, match="in-process"):
        from_bench(str(path))


def test_linear_layouts_times_every_path_and_checks_row_invariance(capsys):
    """benchmarks.linear_layouts: the model's packed Linear is row-invariant (what exact
    verification needs) and the check catches a product whose rows depend on the row count."""
    import torch

    from benchmarks import linear_layouts as ll

    torch.manual_seed(0)
    w = torch.randn(96, 64)
    paths = ll.make_paths([w], threads=1, with_ort=False)
    with torch.inference_mode():
        assert ll.row_invariant(paths["model"], [64], 6)
        ref = paths["model"]({64: torch.ones(1, 64)})[0]
        assert torch.allclose(ref, w.sum(1)[None], atol=1e-4)  # really x W^T

        def drifting(xs):  # rows rounded differently once there are several of them
            x = xs[64]
            return [x @ w.t() * (1 + 1e-6 * (x.shape[0] > 1))]
        assert not ll.row_invariant(drifting, [64], 6)
    assert ll.main(["--threads", "1", "--layers", "1", "--rows", "1", "2", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert all(f"layers+head: {p}" in out for p in ll.PATHS)
    assert "model yes" in out and "ort " in out


def test_draft_placement_in_a_label_is_refused_on_the_distributed_runtime(tmp_path, capsys):
    """The token channel does not carry where the draft runs (its deployment decides), so a
    label asking for onnx_max_len or draft_backend on the distributed runtime would be silently
    ignored: it is refused, before any runtime starts, naming the deployment's keys."""
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": 1, "category": "qa", "turns": ["Hi"]}) + "\n")
    for label in ("sd:model@draft_model=target,draft_quant=gguf,onnx_max_len=1024", "sd:ngram@draft_backend=onnx"):
        with pytest.raises(SystemExit) as e:
            main(["bench", "--runtime", "distributed", "--questions", str(q), "--methods", "ar", label])
        assert e.value.code != 0
        err = capsys.readouterr().err
        assert "deployment config" in err and ("onnx_max_len" in err or "draft_backend" in err)
