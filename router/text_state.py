"""Engine tokens -> response text: incremental detokenization, stop strings (held back while partial), counts."""

from __future__ import annotations

from typing import Any

from model.tokenizer import IncrementalDecoder

from .errors import STATUS_INTERNAL
from .openai_protocol import UsageInfo
from .requests import RequestOutput, TokenOutput


class TextState:
    def __init__(self, tokenizer: Any, prompt_ids: list[int], stops: list[str], stop_token_ids: list[int],
                 logprobs: bool):
        self.decoder = IncrementalDecoder(tokenizer, prompt_ids)
        self.stops, self.stop_token_ids = stops, set(stop_token_ids)
        self.max_stop = max((len(s) for s in stops), default=0)
        self.want_logprobs = logprobs
        self.text, self.sent, self.checked = "", 0, 0
        self.num_prompt, self.num_generated = len(prompt_ids), 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.error: str | None = None
        self.error_status = STATUS_INTERNAL
        self.engine_done = False  # the engine finished the request itself (no abort needed)
        self.new_logprobs: list[TokenOutput] = []

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def feed(self, out: RequestOutput) -> int:
        """Take one engine output; returns how many of its tokens count (none after a stop string)."""
        taken = 0
        for tok in out.tokens:
            if self.finished:
                break
            taken += 1
            self.num_generated += 1
            if self.want_logprobs:
                self.new_logprobs.append(tok)
            self.text += self.decoder.step(tok.token_id)
            self._check_stop()
        if out.finished:
            self.engine_done = True
            if not self.finished:
                self.text += self.decoder.flush()
                self._check_stop()
            if not self.finished:
                self.error = out.error
                if out.error_status:
                    self.error_status = out.error_status
                self.finish_reason = out.finish_reason or "stop"
                last = out.tokens[-1].token_id if out.tokens else None
                if self.finish_reason == "stop" and last in self.stop_token_ids:
                    self.stop_reason = last
        return taken

    def end_without_finish(self) -> None:
        """The engine's stream ended without a finished output."""
        self.engine_done = True
        self.text += self.decoder.flush()
        self.finish_reason = "abort"
        self.error = "the engine ended the request without finishing it"

    def _check_stop(self) -> None:
        if not self.stops:
            return
        start = max(self.sent, self.checked - self.max_stop + 1)
        hits = [(i, s) for s in self.stops if (i := self.text.find(s, start)) >= 0]
        self.checked = len(self.text)
        if hits:
            pos, stop = min(hits)
            self.text = self.text[:pos]
            self.finish_reason, self.stop_reason = "stop", stop

    def take(self) -> str:
        """Text ready to send: all of it once finished, else minus a tail that may begin a stop string."""
        end = len(self.text)
        if not self.finished:
            for k in range(min(self.max_stop - 1, end - self.sent), 0, -1):
                if any(s.startswith(self.text[end - k:]) for s in self.stops):
                    end -= k
                    break
        chunk, self.sent = self.text[self.sent:end], end
        return chunk

    def take_logprobs(self) -> list[TokenOutput]:
        out, self.new_logprobs = self.new_logprobs, []
        return out

    def usage(self) -> UsageInfo:
        return UsageInfo(prompt_tokens=self.num_prompt, completion_tokens=self.num_generated,
                         total_tokens=self.num_prompt + self.num_generated)
