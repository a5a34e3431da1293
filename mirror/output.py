"""What every decoding method does with committed tokens: stop tokens, stop strings,
max_new_tokens, incremental detokenization and the streaming callback."""
from __future__ import annotations

from collections.abc import Callable

from .sampling import SamplingParams
from .tokenizer import IncrementalDetokenizer, Tokenizer


class OutputStream:
    def __init__(self, tokenizer: Tokenizer, params: SamplingParams,
                 on_chunk: Callable[[str, list[int]], None] | None = None):
        """on_chunk(text, ids) is called as output is committed: the new text that is safe to
        show (held back while it could still be the start of a stop string) and the new ids."""
        self.params = params
        self.stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            self.stop_ids.update(tokenizer.eos_ids)
        self.detok = IncrementalDetokenizer(tokenizer)
        self.on_chunk = on_chunk
        self.ids: list[int] = []
        self.text = ""
        self._emitted = 0  # chars of self.text already handed to callbacks
        self._hold = max((len(s) for s in params.stop), default=1) - 1
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, new_ids: list[int]) -> bool:
        """Commit tokens in order; returns True once the output is finished."""
        accepted: list[int] = []
        for t in new_ids:
            if self.finished:
                break
            if t in self.stop_ids:
                self.finish_reason = "stop"
                break
            accepted.append(t)
            if len(self.ids) + len(accepted) >= self.params.max_new_tokens:
                self.finish_reason = "length"
        self.ids.extend(accepted)
        delta = self.detok.push(accepted) if accepted else ""
        chunk = self._add_text(delta) if (delta or self.finished) else ""
        if self.on_chunk and (chunk or accepted):
            self.on_chunk(chunk, accepted)
        return self.finished

    def _add_text(self, delta: str) -> str:
        start = max(0, len(self.text) - self._hold)
        self.text += delta
        for s in self.params.stop:
            i = self.text.find(s, start)
            if i >= 0:
                self.text = self.text[:i]
                self.finish_reason = "stop"
        end = len(self.text) if self.finished else max(self._emitted, len(self.text) - self._hold)
        chunk = self.text[self._emitted:end]
        self._emitted = max(self._emitted, end)
        return chunk

    def finish(self, reason: str) -> None:
        """End the output early (cancelled, error); flushes held-back text."""
        if not self.finished:
            self.finish_reason = reason
            chunk = self._add_text("")
            if self.on_chunk and chunk:
                self.on_chunk(chunk, [])
