"""Passkey retrieval (Mohtashami & Jaggi 2023; the Mixtral paper's Figure 4) against an OpenAI-compatible server.

A prompt of exactly `length` tokens of the served model (counted by its tokenizer: a local one or the server's
/tokenize): an instruction, filler sentences, "The pass key is N. Remember it. N is the pass key." at a depth
(0 = right after the instruction, 1 = right before the question), more filler, then "What is the pass key? The
pass key is". Greedy completion; an answer is correct when the key's digits appear in it.
"""

from __future__ import annotations

import json
import random
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import httpx

FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.")
QUESTION = "What is the pass key? The pass key is"
MAX_NEW_TOKENS = 16  # room for a five-digit key however the tokenizer splits digits
KEY_RANGE = (10000, 99999)  # five digits


def key_sentence(key: int) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


_FILLER_WORDS = " ".join(FILLER).split()


def passkey_text(n_words: int, depth: float, key: int) -> str:
    """The prompt with n_words words of repeated filler (the last sentence may stop short, so lengths can be met
    to a word), the key sentence at the sentence boundary nearest to depth * n_words."""
    fill = [_FILLER_WORDS[i % len(_FILLER_WORDS)] for i in range(n_words)]
    bounds = [0, *(i + 1 for i, w in enumerate(fill) if w.endswith(".")), n_words]
    at = min(bounds, key=lambda b: (abs(b - depth * n_words), b))
    return " ".join([INSTRUCTION, *fill[:at], key_sentence(key), *fill[at:], QUESTION])


def is_correct(key: int, answer: str) -> bool:
    """The key's digits appear in the answer (separators such as spaces or commas between digits ignored)."""
    return str(key) in "".join(re.findall(r"\d", answer))


def fit_prompt(length: int, depth: float, key: int, count: Callable[[str], int]) -> tuple[str, int]:
    """The prompt whose token count (by `count`) is closest to `length` (a filler word off at most): (text, tokens)."""
    base = count(passkey_text(0, depth, key))
    if base >= length:
        raise ValueError(f"--lengths: {length} tokens is too short; the prompt without filler already has {base}")
    per = (count(passkey_text(len(_FILLER_WORDS) * 8, depth, key)) - base) / (len(_FILLER_WORDS) * 8)
    n = max(0, round((length - base) / per))
    seen: dict[int, int] = {}
    while len(seen) < 12:  # Newton steps on a near-linear count, then the neighbours
        seen[n] = count(passkey_text(n, depth, key))
        if seen[n] == length:
            break
        n = max(0, n + (round((length - seen[n]) / per) or (1 if seen[n] < length else -1)))
        if n in seen:
            break
    best = min(seen, key=lambda k: (abs(seen[k] - length), seen[k] > length))
    return passkey_text(best, depth, key), seen[best]


@dataclass(frozen=True)
class PasskeyConfig:
    base_url: str
    lengths: tuple[int, ...] = (1000, 4000, 16000, 32000)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    trials: int = 1
    seed: int = 0
    model: str | None = None  # None: the first of /v1/models
    api_key: str | None = None
    tokenizer: str | None = None  # a checkpoint directory; None: the server's /tokenize
    chat: bool = False  # /v1/chat/completions with the prompt as the user message
    timeout_s: float = 3600.0  # per request: a 32k prefill on a CPU takes a while

    def validate(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"--base-url: expected http(s)://host:port, got {self.base_url!r}")
        if not self.lengths or any(n < 1 for n in self.lengths):
            raise ValueError(f"--lengths: expected positive token counts, got {list(self.lengths)}")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"--depths: expected fractions in [0, 1], got {list(self.depths)}")
        if self.trials < 1:
            raise ValueError(f"--trials: must be at least 1, got {self.trials}")


@dataclass
class PasskeyRun:
    config: PasskeyConfig
    model: str
    max_model_len: int | None
    results: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False
    error: str | None = None  # what stopped the run part way (the results so far are kept)

    @property
    def accuracy(self) -> float:
        return sum(r["correct"] for r in self.results) / len(self.results) if self.results else 0.0

    def grid(self) -> list[dict[str, Any]]:
        """Accuracy per (length, depth), in the asked order."""
        out = []
        for length in self.config.lengths:
            for depth in self.config.depths:
                cell = [r["correct"] for r in self.results if r["length"] == length and r["depth"] == depth]
                if cell:
                    out.append({"length": length, "depth": depth, "trials": len(cell),
                                "accuracy": sum(cell) / len(cell)})
        return out

    def to_json(self, argv: list[str] | None = None) -> dict[str, Any]:
        c = self.config
        return {"accuracy": self.accuracy, "results": self.results, "by_length_depth": self.grid(),
                "model": self.model, "command": "expertmesh " + " ".join(redact_argv(argv or [])),
                "base_url": c.base_url, "endpoint": _endpoint(c.chat), "max_model_len": self.max_model_len,
                "lengths": list(c.lengths), "depths": list(c.depths), "trials": c.trials, "seed": c.seed,
                "tokenizer": c.tokenizer or "server /tokenize", "max_tokens": MAX_NEW_TOKENS,
                "temperature": 0.0, "interrupted": self.interrupted, "error": self.error,
                "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}

    def save(self, path: str, argv: list[str] | None = None) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_json(argv), f, indent=2)


def redact_argv(argv: list[str]) -> list[str]:
    """argv with the value of --api-key replaced, so the command line can be stored."""
    out, hide = [], False
    for a in argv:
        if hide:
            out.append("***")
            hide = False
        elif a == "--api-key":
            out.append(a)
            hide = True
        elif a.startswith("--api-key="):
            out.append("--api-key=***")
        else:
            out.append(a)
    return out


def _endpoint(chat: bool) -> str:
    return "/v1/chat/completions" if chat else "/v1/completions"


class _Server:
    """The few calls the evaluation makes; any non-200 answer raises ValueError with the server's message."""

    def __init__(self, cfg: PasskeyConfig):
        self.cfg = cfg
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        self.http = httpx.Client(base_url=cfg.base_url.rstrip("/"), headers=headers,
                                 timeout=httpx.Timeout(cfg.timeout_s, connect=30.0))

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            r = self.http.request(method, path, json=body)
        except httpx.HTTPError as e:
            raise ValueError(f"--base-url: {method} {self.cfg.base_url.rstrip('/')}{path} failed "
                             f"({type(e).__name__}: {e})") from None
        if r.status_code != 200:
            hint = " (--api-key or EXPERTMESH_API_KEY)" if r.status_code == 401 else ""
            raise ValueError(f"{method} {path}: HTTP {r.status_code}{hint}: {r.text[:300]}")
        return r.json()

    def model(self) -> tuple[str, int | None]:
        data = self._call("GET", "/v1/models").get("data") or []
        card = next((m for m in data if self.cfg.model in (None, m.get("id"))), None)
        if card is None:
            names = [m.get("id") for m in data]
            raise ValueError(f"--model: {self.cfg.model!r} is not served here (served: {names})")
        return card["id"], card.get("max_model_len")

    def count(self, model: str, text: str) -> int:
        body: dict[str, Any] = {"model": model}
        if self.cfg.chat:
            body.update(messages=[{"role": "user", "content": text}], add_generation_prompt=True)
        else:
            body.update(prompt=text, add_special_tokens=True)
        return int(self._call("POST", "/tokenize", body)["count"])

    def complete(self, model: str, text: str) -> tuple[str, int | None]:
        body: dict[str, Any] = {"model": model, "max_tokens": MAX_NEW_TOKENS, "temperature": 0.0}
        if self.cfg.chat:
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
        out = self._call("POST", _endpoint(self.cfg.chat), body)
        choice = out["choices"][0]
        answer = choice["message"]["content"] if self.cfg.chat else choice["text"]
        return answer or "", (out.get("usage") or {}).get("prompt_tokens")


def _local_counter(cfg: PasskeyConfig) -> Callable[[str], int]:
    from model.tokenizer import Tokenizer

    try:
        tok = Tokenizer.from_dir(cfg.tokenizer)  # type: ignore[arg-type]
    except ValueError as e:
        raise ValueError(f"--tokenizer: {e}") from None
    if cfg.chat:
        return lambda text: len(tok.apply_chat_template([{"role": "user", "content": text}]))
    return lambda text: len(tok.encode(text, add_bos=True))


class Progress:
    """A progress bar on stderr; where stderr is not a terminal (a log), one line per finished length."""

    def __init__(self, total: int, bar: bool | None = None, stream: Any = None, width: int = 30):
        self.stream = stream or sys.stderr
        self.bar = self.stream.isatty() if bar is None else bar
        self.total, self.width, self.t0 = total, width, time.monotonic()

    def update(self, done: int, correct: int, what: str = "", milestone: bool = False) -> None:
        acc = f"{correct / done:.0%}" if done else "-"
        elapsed = f"{time.monotonic() - self.t0:.0f}s"
        if self.bar:
            fill = round(self.width * done / max(self.total, 1))
            self.stream.write(f"\r[passkey] [{'#' * fill}{'.' * (self.width - fill)}] {done}/{self.total} "
                              f"correct {acc} {elapsed} {what:<24}" + ("\n" if done == self.total else ""))
        elif milestone:
            self.stream.write(f"[passkey] {done}/{self.total} done, correct {acc}, {elapsed} ({what})\n")
        self.stream.flush()


def run_passkey(cfg: PasskeyConfig, progress: Progress | None = None) -> PasskeyRun:
    """Every (length, depth, trial), in that order; Ctrl-C or a failed request after the first answer stops early
    and keeps what was measured (`interrupted`, `error`)."""
    cfg.validate()
    server = _Server(cfg)
    try:
        model, max_len = server.model()
        if max_len is not None:
            too_long = [n for n in cfg.lengths if n + MAX_NEW_TOKENS > max_len]
            if too_long:
                raise ValueError(f"--lengths: {too_long[0]} tokens plus {MAX_NEW_TOKENS} for the answer exceed "
                                 f"the model's max_model_len ({max_len})")
        count = _local_counter(cfg) if cfg.tokenizer else (lambda text: server.count(model, text))
        run = PasskeyRun(cfg, model, max_len)
        rng = random.Random(cfg.seed)
        cells = [(n, d, t) for n in cfg.lengths for d in cfg.depths for t in range(cfg.trials)]
        progress = progress or Progress(len(cells))
        correct = 0
        try:
            for length, depth, trial in cells:
                key = rng.randint(*KEY_RANGE)
                text, n_tokens = fit_prompt(length, depth, key, count)
                answer, served_tokens = server.complete(model, text)
                ok = is_correct(key, answer)
                correct += ok
                run.results.append({"length": length, "depth": depth, "trial": trial, "passkey": str(key),
                                    "answer": answer, "correct": ok,
                                    "prompt_tokens": served_tokens if served_tokens is not None else n_tokens})
                last_of_length = depth == cfg.depths[-1] and trial == cfg.trials - 1
                progress.update(len(run.results), correct, f"length {length} depth {depth:g}", last_of_length)
        except KeyboardInterrupt:
            run.interrupted = True
        except ValueError as e:  # a failed request: keep what was measured
            if not run.results:
                raise
            run.error = str(e)
        return run
    finally:
        server.http.close()


def format_report(run: PasskeyRun) -> str:
    """Accuracy per length (rows) and depth (columns), as the Mixtral paper's Figure 4 reads."""
    depths = run.config.depths
    cells = {(g["length"], g["depth"]): g["accuracy"] for g in run.grid()}
    lines = [f"passkey retrieval, {run.model}: {run.accuracy:.1%} of {len(run.results)} "
             f"({run.config.trials} trial(s) per cell{', interrupted' if run.interrupted else ''})",
             f"{'length':>8} " + " ".join(f"{'depth ' + format(d, 'g'):>10}" for d in depths)]
    for n in run.config.lengths:
        row = [f"{cells[(n, d)]:>10.0%}" if (n, d) in cells else f"{'-':>10}" for d in depths]
        lines.append(f"{n:>8} " + " ".join(row))
    return "\n".join(lines)


def plot_passkey(run: PasskeyRun, path: str) -> None:
    """A length x depth heatmap of accuracy (red 0% .. green 100%), each cell labelled."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lengths, depths = run.config.lengths, run.config.depths
    cells = {(g["length"], g["depth"]): g["accuracy"] for g in run.grid()}
    grid = np.full((len(lengths), len(depths)), np.nan)
    for i, n in enumerate(lengths):
        for j, d in enumerate(depths):
            grid[i, j] = cells.get((n, d), np.nan)
    fig = Figure(figsize=(1.3 * len(depths) + 2.6, 0.55 * len(lengths) + 1.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(len(lengths)):
        for j in range(len(depths)):
            if not np.isnan(grid[i, j]):
                dark = not 0.2 < grid[i, j] < 0.85  # white on the deep red and green ends
                ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center", fontsize=9,
                        color="white" if dark else "black")
    ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_xlabel("depth of the pass key (0 = start, 1 = end)")
    ax.set_ylabel("context length (tokens)")
    ax.set_title(f"passkey retrieval: {run.model}, {run.accuracy:.0%} overall ({run.config.trials} per cell)",
                 fontsize=10)
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.savefig(path, dpi=100)
