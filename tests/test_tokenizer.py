import pytest

from mirror.tokenizer import IncrementalDetokenizer

TEXTS = ["Hello, world!", "  leading spaces and\ttabs\nnewlines", "digits 1234567890 and 3.14159",
         "café naïve ünïcödé", "日本語のテキスト", "emoji 🙂🚀 mixed with text", "<|im_start|>user\nhi<|im_end|>"]


@pytest.mark.parametrize("text", TEXTS)
def test_bundled_tokenizer_round_trips(bundled, text):
    tok = bundled.tokenizer
    ids = tok.encode(text)
    assert tok.decode(ids) == text


def test_special_tokens_are_single_ids(bundled):
    tok = bundled.tokenizer
    ids = tok.encode("<|im_start|>user")
    assert ids[0] == tok.tok.token_to_id("<|im_start|>")
    assert 2 in tok.eos_ids  # <|im_end|>


def test_digits_are_split_individually(bundled):
    # SmolLM2's pre-tokenizer (GGUF pre = "smollm") splits every digit
    tok = bundled.tokenizer
    assert len(tok.encode("12345")) == 5


def test_chat_template_renders_from_gguf_metadata(bundled):
    tok = bundled.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_incremental_detokenizer_matches_full_decode(bundled):
    tok = bundled.tokenizer
    text = "Streaming ünïcödé 日本語 🙂 text, token by token."
    ids = tok.encode(text)
    d = IncrementalDetokenizer(tok)
    pieces = [d.push([i]) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
