"""The n-gram window stop (mirror/decoding/drafters/window_stop.py) and `mirror calibrate-stop`."""
import itertools
import json

import pytest

from mirror.cli import main
from mirror.decoding.drafters.ngram import NgramDrafter, NgramModel
from mirror.decoding.drafters.window_stop import WindowStop, context_key, datastore_key
from mirror.sampling import SamplingParams
from mirror.training.replay import replay
from mirror.training.window_stop import acceptance_counts, measure_cost

from helpers import tiny_model

P = SamplingParams()


def _brute_length(stop: WindowStop, keys: list[str]) -> int:
    def value(g):
        e, s = 0.0, 1.0
        for k in keys[:g]:
            s *= stop.p(k)
            e += s
        return (1 + e) / stop.step_cost(g + 1)
    return max(range(len(keys) + 1), key=lambda g: (value(g), -g))


def test_length_maximises_expected_tokens_per_unit_of_target_time():
    cost = [1.0, 1.0, 1.05, 1.1, 1.2, 1.3]
    sure = WindowStop({"c4.0.1": 0.99, "d1.0": 0.01}, cost)
    assert sure.length(["c4.0.1"] * 5) == 5  # nearly certain tokens: send them all
    # hopeless ones: one goes out in the free slot (a 2-token window costs what one does), no more
    assert sure.length(["d1.0"] * 5) == 1
    steep = WindowStop(sure.accept, [1.0, 1.05, 1.1, 1.15])
    assert steep.length(["d1.0"] * 5) == 0  # no free slot: a plain step is cheaper
    rng_p = [0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95]
    keys = [f"k{i}" for i in range(len(rng_p))]
    stop = WindowStop(dict(zip(keys, rng_p)), cost)
    for combo in itertools.product(keys, repeat=4):
        assert stop.length(list(combo)) == _brute_length(stop, list(combo))


def test_cost_is_relative_and_extrapolated_and_unknown_keys_use_the_pooled_rate():
    stop = WindowStop({"c*": 0.7, "d*": 0.2}, [50.0, 50.0, 55.0, 60.0])
    assert stop.cost == [1.0, 1.0, 1.1, 1.2]
    assert stop.step_cost(6) == pytest.approx(1.4)  # last slope carried on
    assert stop.p("c3.1.0") == 0.7 and stop.p("d2.0") == 0.2
    with pytest.raises(ValueError, match="positive"):
        WindowStop({}, [0.0, 1.0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        WindowStop({"c2.0.0": 1.5}, [1.0])


def test_fit_smooths_counts_and_round_trips(tmp_path):
    stop = WindowStop.fit({"c2.0.0": [8, 6], "c4.1.1": [2, 2], "d1.0": [10, 1]}, [1.0, 1.1], {"note": "x"})
    assert stop.accept["c2.0.0"] == pytest.approx(7 / 10)
    assert stop.accept["c*"] == pytest.approx(9 / 12) and stop.accept["d*"] == pytest.approx(2 / 12)
    path = tmp_path / "stop.json"
    stop.save(str(path))
    back = WindowStop.load(str(path))
    assert back.accept == stop.accept and back.cost == stop.cost and back.meta["counts"]["d1.0"] == [10, 1]
    (tmp_path / "bad.json").write_text(json.dumps({"entries": []}))
    with pytest.raises(ValueError, match="not a window stop file"):
        WindowStop.load(str(tmp_path / "bad.json"))


def _store():
    corpus = [[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 8, 9, 10, 11], [1, 2, 3, 4, 1, 2, 3, 4], [1, 2, 3, 4]]
    return NgramModel.build(corpus, n_min=1, n_max=4, min_count=1)


def test_keys_name_the_source_of_every_drafted_token():
    d = NgramDrafter(P, datastore=_store(), keyed=True)
    d.start([40, 5, 6, 43, 44, 45, 40, 5])  # context match "40 5" -> 6 43 44 45 40 5, then datastore
    w = d.propose(7)
    assert w.ids == [6, 43, 44, 45, 40, 5, 6] and len(d.last_keys) == 7
    assert d.last_keys[0] == context_key(2, 0, True) == "c2.0.1"  # the datastore also says 6 after "5"
    assert d.last_keys[1] == "c2.1.0" and d.last_keys[5] == context_key(2, 5, False) == "c2.3.0"  # capped
    assert d.last_keys[6] == datastore_key(1, 6) == "d1.4"  # known by "5" alone, offset capped at 4
    d.start([9, 1, 2, 3])  # no context match: datastore tokens, longest known suffix first
    w = d.propose(3)
    assert w.ids == [4, 1, 2] and d.last_keys == [datastore_key(3, 0), datastore_key(4, 1), datastore_key(4, 2)]


def test_expected_accepted_tokens_and_the_scored_window():
    stop = WindowStop({"c*": 0.9, "d*": 0.3, "c2.0.1": 0.5, "d1.4": 0.1}, [1.0, 1.1])
    keys = ["c2.0.1", "c2.1.0", "d1.4"]
    assert stop.expected(keys) == pytest.approx(0.5 + 0.5 * 0.9 + 0.5 * 0.9 * 0.1)
    assert stop.expected([]) == 0.0
    store = _store()
    plain, scored = NgramDrafter(P, datastore=store), NgramDrafter(P, datastore=store, score=stop)
    for ctx in ([40, 5, 6, 43, 44, 45, 40, 5], [9, 1, 2, 3]):
        plain.start(ctx)
        scored.start(ctx)
        a, b = plain.propose(5), scored.propose(5)
        assert a.ids == b.ids and a.expected is None  # scoring does not cut
        assert b.expected == pytest.approx(stop.expected(scored.last_keys))


def test_a_stopped_window_is_a_prefix_of_the_full_one():
    store = _store()
    full = NgramDrafter(P, datastore=store, keyed=True)
    stopped = NgramDrafter(P, datastore=store, stop=WindowStop({"c*": 0.9, "d*": 0.3, "d4.1": 0.01},
                                                              [1.0, 1.0, 1.1, 1.2, 1.3, 1.4]))
    cut = 0
    for ctx in ([9, 1, 2, 3], [40, 41, 42, 43, 40, 41, 5, 6], [7, 7, 7], [1, 2]):
        full.start(ctx)
        stopped.start(ctx)
        a, b = full.propose(5).ids, stopped.propose(5).ids
        assert a[:len(b)] == b and stopped.last_keys == full.last_keys[:len(b)]
        assert len(b) == stopped.stop.length(full.last_keys)
        cut += len(a) - len(b)
    assert cut > 0
    with pytest.raises(ValueError, match="mixed"):
        NgramDrafter(P, datastore=store, mode="mixed", stop=stopped.stop)


def test_acceptance_counts_add_up_to_the_replay():
    store = _store()
    answer = [5, 6, 7, 8, 1, 2, 3, 4, 9, 10, 11, 5, 6, 7, 8, 9, 10, 12]
    pairs = [([1, 2], answer), ([3], answer[::-1])]
    counts, rep = acceptance_counts(pairs, store, gamma=4, progress=False)
    # brute force: accepted tokens and rejections seen by an observer of the same replay
    acc = rej = 0
    for prompt, ans in pairs:
        def observe(w, a_, pos, a):
            nonlocal acc, rej
            acc += a
            rej += int(a < len(w.ids) and pos + a < len(a_))
        replay(NgramDrafter(P, datastore=store), prompt, ans, 4, observe)
    assert sum(c[1] for c in counts.values()) == acc
    assert sum(c[0] - c[1] for c in counts.values()) == rej
    assert rep["tokens"] == 2 * (len(answer) - 1) and rep["steps"] > 0


def test_measure_cost_is_relative_and_non_decreasing():
    model = tiny_model()
    c = measure_cost(model, 4, reps=2, context=16, progress=False)
    assert len(c) == 4 and c[0] == 1.0 and all(b >= a for a, b in zip(c, c[1:]))


def _answers_dir(tmp_path, skip):
    data = tmp_path / "train_prompts.jsonl"  # the datastore's source name: overlap is checked
    data.write_text("\n".join(json.dumps({"prompt": f"question {i}"}) for i in range(3010)))
    d = tmp_path / f"answers{skip}"
    d.mkdir()
    settings = {"data": "train_prompts.jsonl", "seed": 0, "skip": skip, "max_new_tokens": 8, "max_prompt_tokens": 64}
    rows = [{"settings": settings}] + [{"i": i, "ids": [28, 504, 314, 1345, 28, 504, 314, 1345, 28][: 5 + i]}
                                       for i in range(3)]
    (d / "answers.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return str(data), str(d)


def test_calibrate_stop_command_writes_a_loadable_table(bundled, tmp_path, capsys):
    data, answers = _answers_dir(tmp_path, skip=3000)
    out = tmp_path / "stop.json"
    rc = main(["calibrate-stop", "--answers", answers, "--data", data, "--out", str(out), "--gamma", "4",
               "--cost", "1,1,1.1,1.2,1.3"])
    assert rc == 0
    stop = WindowStop.load(str(out))
    assert stop.cost == [1.0, 1.0, 1.1, 1.2, 1.3] and stop.meta["answers"] == 3 and not stop.meta["cost_measured"]
    assert stop.meta["replay"]["tokens"] == sum(4 + i for i in range(3))
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["keys"] == len(stop.accept)


@pytest.mark.parametrize("argv,message", [
    (["--answers", "{missing}"], "not a `mirror build-datastore` folder"),
    (["--answers", "{inside}"], "inside the 3000 prompts the datastore was built from"),
    (["--answers", "{ok}", "--cost", "1,zero"], "--cost"),
    (["--answers", "{ok}", "--cost", "1,-1"], "--cost: window stop: cost must list positive"),
    (["--answers", "{ok}", "--gamma", "0"], "--gamma must be positive"),
    (["--answers", "{ok}", "--datastore", "{missing}"], "--datastore"),
])
def test_calibrate_stop_refuses_bad_input(tmp_path, capsys, argv, message):
    data, inside = _answers_dir(tmp_path, skip=0)
    _, ok = _answers_dir(tmp_path, skip=3000)
    sub = {"missing": str(tmp_path / "nope"), "inside": inside, "ok": ok}
    with pytest.raises(SystemExit) as e:
        main(["calibrate-stop", "--data", data, "--out", str(tmp_path / "s.json")]
             + [a.format(**sub) for a in argv])
    assert e.value.code != 0
    assert message in capsys.readouterr().err


def test_a_stop_holds_one_cost_curve_per_target_backend(tmp_path):
    stop = WindowStop({"c2.0.0": 0.5}, [2.0, 2.2, 2.4], costs={"onnx": [1.0, 1.3, 1.5]})
    assert stop.cost == pytest.approx([1.0, 1.1, 1.2])
    onnx = stop.for_backend("onnx")
    assert onnx.cost == pytest.approx([1.0, 1.3, 1.5]) and onnx.accept == stop.accept
    assert stop.for_backend("torch") is stop  # no curve of its own: the default one
    assert stop.for_backend("onnx") is onnx  # made once
    stop.save(str(tmp_path / "s.json"))
    back = WindowStop.load(str(tmp_path / "s.json"))
    assert back.costs == {"onnx": pytest.approx([1.0, 1.3, 1.5])}
    with pytest.raises(ValueError, match="positive"):
        WindowStop({}, [1.0], costs={"onnx": [1.0, -1.0]})


def test_the_drafter_cuts_windows_with_the_curve_of_the_target_it_feeds(tmp_path):
    from mirror.decoding.factory import build_drafter
    from mirror.spec_config import SpecConfig

    path = tmp_path / "s.json"
    WindowStop({"c2.0.0": 0.5}, [1.0, 1.1], costs={"onnx": [1.0, 1.6]}).save(str(path))
    spec = SpecConfig(method="sd", draft="ngram", window_stop=str(path))
    model = tiny_model()
    assert build_drafter(model, spec, P, 64).stop.cost == pytest.approx([1.0, 1.1])  # eager target
    assert build_drafter(model, spec, P, 64, target_backend="onnx").stop.cost == pytest.approx([1.0, 1.6])


def test_calibrate_stop_update_adds_a_backends_curve_and_keeps_the_table(tmp_path, capsys):
    data, answers = _answers_dir(tmp_path, skip=3000)
    first = tmp_path / "stop.json"
    assert main(["calibrate-stop", "--answers", answers, "--data", data, "--out", str(first), "--gamma", "4",
                 "--cost", "1,1,1.1,1.2,1.3"]) == 0
    out = tmp_path / "stop2.json"
    assert main(["calibrate-stop", "--update", str(first), "--target-backend", "onnx", "--out", str(out),
                 "--cost", "2,2.2,2.6,3,3.4"]) == 0
    before, after = WindowStop.load(str(first)), WindowStop.load(str(out))
    assert after.accept == before.accept and after.cost == before.cost
    assert after.for_backend("onnx").cost == pytest.approx([1.0, 1.1, 1.3, 1.5, 1.7])
    assert after.meta["costs_measured"]["onnx"]["measured"] is False
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["backend"] == "onnx"
    with pytest.raises(SystemExit) as e:
        main(["calibrate-stop", "--update", str(tmp_path / "nope.json"), "--cost", "1,1"])
    assert e.value.code != 0 and "--update" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["calibrate-stop", "--data", data])
    assert e.value.code != 0 and "--answers DIR is required" in capsys.readouterr().err
