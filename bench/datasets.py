"""Load-test prompts: seeded random token-id (or word) prompts, or a JSONL dataset."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Token ids drawn for random prompts: above the usual special ids, inside any real vocabulary (and the tiny
# test model's 512).
TOKEN_ID_RANGE = (10, 500)
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


def _uniform_lens(rng: random.Random, n: int, mean: int, ratio: float) -> list[int]:
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


def random_requests(n: int, input_len: int, output_len: int, range_ratio: float = 0.0, seed: int = 0,
                    chat: bool = False, token_id_range: tuple[int, int] = TOKEN_ID_RANGE) -> list[SampleRequest]:
    """n prompts with lengths uniform in [len*(1-r), len*(1+r)]: token ids, or random words for chat."""
    rng = random.Random(seed)
    in_lens = _uniform_lens(rng, n, input_len, range_ratio)
    out_lens = _uniform_lens(rng, n, output_len, range_ratio)
    out = []
    for il, ol in zip(in_lens, out_lens, strict=True):
        if chat:
            text = " ".join(rng.choice(WORDS) for _ in range(il))
            out.append(SampleRequest(messages=[{"role": "user", "content": text}], prompt_len=il, output_len=ol))
        else:
            ids = [rng.randrange(*token_id_range) for _ in range(il)]
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
