"""Stop tokens, stop strings, max tokens and streaming, on a byte-level tokenizer."""
import pytest

from helpers import byte_tokenizer
from mirror.output import OutputStream
from mirror.sampling import SamplingParams


def ids(s):
    return list(s.encode())


def run(params, pushes):
    chunks = []
    out = OutputStream(byte_tokenizer(), params, on_chunk=lambda t, i: chunks.append(t))
    for p in pushes:
        if out.push(p):
            break
    return out, "".join(chunks)


def test_max_new_tokens_cuts_mid_window():
    out, streamed = run(SamplingParams(max_new_tokens=5), [ids("abc"), ids("defgh")])
    assert out.text == "abcde" and out.finish_reason == "length" and streamed == "abcde"


def test_eos_stops_and_is_not_emitted():
    out, streamed = run(SamplingParams(max_new_tokens=50), [ids("hello") + [0] + ids("more")])
    assert out.text == "hello" and out.finish_reason == "stop" and out.ids == ids("hello")


def test_ignore_eos_and_stop_token_ids():
    out, _ = run(SamplingParams(max_new_tokens=50, ignore_eos=True, stop_token_ids=[ord("!")]),
                 [ids("a") + [0] + ids("b!c")])
    assert out.ids == ids("a") + [0] + ids("b") and out.finish_reason == "stop"


def test_stop_string_spanning_pushes_is_never_streamed():
    out, streamed = run(SamplingParams(max_new_tokens=50, stop=["END"]), [ids("one tw"), ids("o E"), ids("NDx")])
    assert out.text == "one two " and streamed == "one two " and out.finish_reason == "stop"


def test_held_back_text_is_flushed_at_length():
    out, streamed = run(SamplingParams(max_new_tokens=4, stop=["xyz"]), [ids("abcx")])
    assert streamed == "abcx" and out.finish_reason == "length"


@pytest.mark.parametrize("kw", [dict(max_new_tokens=0), dict(temperature=-1.0), dict(temperature=float("nan")),
                                dict(top_p=0.0), dict(top_k=-2), dict(stop=[""])])
def test_invalid_sampling_params_are_rejected(kw):
    with pytest.raises(ValueError):
        SamplingParams(**kw)
