"""Load-test prompts: seeded random token-id (or word) prompts, or a JSONL dataset.

Random token ids come from the served model's vocabulary (its special ids left out), learnt from a local
tokenizer (`--tokenizer DIR`) or from the server itself: /tokenize names the special ids it adds, and
/detokenize, which answers 400 for an id out of the vocabulary, bounds the vocabulary by bisection.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

MAX_VOCAB_PROBE = 1 << 24  # /detokenize bisection bound: no tokenizer has 16M ids
WORDS = ("the of and to in is was for on that with as by at from his her an are were which this be or had "
         "not but what all when there can one more time about into out up other some them these so would "
         "model token expert layer route serve batch cluster worker load").split()


@dataclass(frozen=True)
class SampleRequest:
    """One request's input: a completion prompt (text or token ids) or chat messages."""

    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    prompt_len: int = 0  # estimate (exact for token ids); the server's usage.prompt_tokens replaces it
    output_len: int | None = None  # max_tokens
    exact: bool = True  # ask for exactly output_len tokens (ignore_eos)


@dataclass(frozen=True)
class Vocab:
    """Ids a random prompt may use: [0, size) less the special ids."""

    size: int
    special: frozenset[int] = frozenset()
    source: str = ""  # where it was learnt, for error messages and the report

    def __post_init__(self) -> None:
        if self.size - len({i for i in self.special if 0 <= i < self.size}) < 1:
            raise ValueError(f"vocabulary ({self.source or 'given'}): no ordinary token id in [0, {self.size})")

    def draw(self, rng: random.Random, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            t = rng.randrange(self.size)
            if t not in self.special:
                out.append(t)
        return out


def tokenizer_vocab(path: str) -> Vocab:
    """The vocabulary of a checkpoint directory's tokenizer.json (--tokenizer DIR)."""
    from model.tokenizer import Tokenizer

    try:
        tok = Tokenizer.from_dir(path)
    except ValueError as e:
        raise ValueError(f"--tokenizer: {e}") from None
    special = {tok.bos_token_id, tok.eos_token_id}
    special |= {i for i, t in tok.backend.get_added_tokens_decoder().items() if t.special}
    return Vocab(tok.vocab_size, frozenset(special), f"--tokenizer {path}")


def server_vocab(base_url: str, model: str, headers: dict[str, str], timeout_s: float = 30.0) -> Vocab:
    """The served model's vocabulary, asked of the server: special ids from /tokenize of an empty prompt, the
    size by bisecting /detokenize (about 25 small requests). ValueError naming --tokenizer when it cannot tell."""
    root = base_url.rstrip("/")
    hint = "; pass --tokenizer DIR (the model's tokenizer.json) instead"

    def post(path: str, body: dict[str, Any]) -> httpx.Response:
        try:
            return httpx.post(root + path, json={"model": model, **body}, headers=headers, timeout=timeout_s)
        except httpx.HTTPError as e:
            raise ValueError(f"--tokenizer: not given, and {root}{path} could not be asked for the vocabulary "
                             f"({type(e).__name__}: {e}){hint}") from None

    r = post("/tokenize", {"prompt": "", "add_special_tokens": True})
    if r.status_code == 401:
        raise ValueError(f"--api-key: {root}/tokenize answered HTTP 401 (the vocabulary of random prompts is "
                         "asked of the server)")
    if r.status_code != 200:
        raise ValueError(f"--tokenizer: not given, and {root}/tokenize answered HTTP {r.status_code}: "
                         f"{r.text[:200]}{hint}")
    special = frozenset(int(t) for t in r.json().get("tokens", []))

    def known(i: int) -> bool:
        r = post("/detokenize", {"tokens": [i]})
        if r.status_code not in (200, 400):
            raise ValueError(f"--tokenizer: not given, and {root}/detokenize answered HTTP {r.status_code}: "
                             f"{r.text[:200]}{hint}")
        return r.status_code == 200

    if not known(0) or known(MAX_VOCAB_PROBE):
        raise ValueError(f"--tokenizer: not given, and {root}/detokenize does not tell token ids in the vocabulary "
                         f"from ids out of it{hint}")
    lo, hi = 0, MAX_VOCAB_PROBE  # known(lo) and not known(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if known(mid) else (lo, mid)
    return Vocab(hi, special, f"{root}/detokenize")


def _uniform_lens(rng: random.Random, n: int, mean: int, ratio: float) -> list[int]:
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


def random_requests(n: int, input_len: int, output_len: int, range_ratio: float = 0.0, seed: int = 0,
                    chat: bool = False, vocab: Vocab | None = None) -> list[SampleRequest]:
    """n prompts with lengths uniform in [len*(1-r), len*(1+r)]: token ids of `vocab`, or random words for chat."""
    if not chat and vocab is None:
        raise ValueError("random token-id prompts need the model's vocabulary (--tokenizer DIR, or a server "
                         "with /tokenize and /detokenize)")
    rng = random.Random(seed)
    in_lens = _uniform_lens(rng, n, input_len, range_ratio)
    out_lens = _uniform_lens(rng, n, output_len, range_ratio)
    out = []
    for il, ol in zip(in_lens, out_lens, strict=True):
        if chat:
            text = " ".join(rng.choice(WORDS) for _ in range(il))
            out.append(SampleRequest(messages=[{"role": "user", "content": text}], prompt_len=il, output_len=ol))
        else:
            ids = vocab.draw(rng, il)  # type: ignore[union-attr]
            out.append(SampleRequest(prompt=ids, prompt_len=il, output_len=ol))
    return out


def load_dataset(path: str | Path, n: int, chat: bool, default_output_len: int) -> list[SampleRequest]:
    """n requests from a JSONL file of {"prompt": str | [ids], "output_len"?} or {"messages": [...]} lines.

    Lines are reused in order when the file has fewer than n. A line's output_len is exact (ignore_eos);
    without one, max_tokens is default_output_len and the model may stop early.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--dataset: no such file: {path}")
    samples = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                samples.append(_parse_line(line, f"{path}:{lineno}", chat, default_output_len))
    if not samples:
        raise ValueError(f"--dataset: {path} has no requests")
    return [samples[i % len(samples)] for i in range(n)]


def _parse_line(line: str, where: str, chat: bool, default_output_len: int) -> SampleRequest:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"--dataset {where}: invalid JSON ({e})") from None
    if not isinstance(obj, dict) or ("prompt" in obj) == ("messages" in obj):
        raise ValueError(f"--dataset {where}: expected an object with either \"prompt\" or \"messages\"")
    out_len = obj.get("output_len")
    if out_len is not None and (not isinstance(out_len, int) or isinstance(out_len, bool) or out_len < 1):
        raise ValueError(f"--dataset {where}: output_len must be a positive integer, got {out_len!r}")
    common = {"output_len": out_len or default_output_len, "exact": out_len is not None}
    if "messages" in obj:
        msgs = obj["messages"]
        if not chat:
            raise ValueError(f"--dataset {where}: \"messages\" lines need --endpoint /v1/chat/completions")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
            raise ValueError(f"--dataset {where}: \"messages\" must be a non-empty list of objects")
        words = sum(len(str(m.get("content", "")).split()) for m in msgs)
        return SampleRequest(messages=msgs, prompt_len=words, **common)
    prompt = obj["prompt"]
    if isinstance(prompt, str) and prompt:
        if chat:
            return SampleRequest(messages=[{"role": "user", "content": prompt}], prompt_len=len(prompt.split()),
                                 **common)
        return SampleRequest(prompt=prompt, prompt_len=len(prompt.split()), **common)
    if (isinstance(prompt, list) and prompt and not chat
            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        return SampleRequest(prompt=prompt, prompt_len=len(prompt), **common)
    what = "a non-empty string" if chat else "a non-empty string or list of token ids"
    raise ValueError(f"--dataset {where}: \"prompt\" must be {what}")
