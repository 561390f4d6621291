"""Byte-level BPE tokenizer: build a synthetic one, write HF files, encode/decode and Mixtral chat format."""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (UNK, BOS, EOS)
INST_TOKENS = ("[INST]", "[/INST]")
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256

# Mixtral-8x7B-Instruct-v0.1's template, plus the optional leading system message (joined to the first user
# turn with a blank line, as Mistral's templates do) and OpenAI-style lists of text parts (joined with "\n").
CHAT_TEMPLATE = (
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] != 'text' -%}{{ raise_exception('Only text content parts are supported!') }}"
    "{%- endif -%}{{ part['text'] }}{%- if not loop.last -%}{{ '\\n' }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system_message = text(messages[0]['content']) -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{{ bos_token }}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and system_message is defined -%}"
    "{{ '[INST] ' + system_message + '\\n\\n' + text(message['content']) + ' [/INST]' }}"
    "{%- else -%}{{ '[INST] ' + text(message['content']) + ' [/INST]' }}{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}{{ text(message['content']) + eos_token }}"
    "{%- else -%}{{ raise_exception('Only user and assistant roles are supported, with the exception of "
    "an initial optional system message!') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# --- building a synthetic byte-level BPE ------------------------------------------------------------------

_WORDS = (
    "the of and to a in is it you that he was for on are with as I his they be at one have this from or "
    "had by hot word but what some we can out other were all there when up use your how said an each she "
    "which do their time if will way about many then them write would like so these her long make thing "
    "see him two has look more day could go come did number sound no most people my over know water than "
    "call first who may down side been now find any new work part take get place made live where after "
    "back little only round man year came show every good me give our under name very through just form "
    "sentence great think say help low line differ turn cause much mean before move right boy old too "
    "same tell does set three want air well also play small end put home read hand port large spell add "
    "even land here must big high such follow act why ask men change went light kind off need house "
    "picture try us again animal point mother world near build self earth father model expert token "
    "router layer server request answer question hello please story write explain summary The A In It "
    "What How Why Please Hello Tell Write Explain"
).split()
_ONSETS = ("", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "br",
           "ch", "cl", "cr", "dr", "fl", "gr", "pl", "pr", "sh", "sl", "sp", "st", "str", "th", "tr", "wh")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ee", "io", "oo", "ou", "y")
_CODAS = ("", "", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "nt", "rt", "st", "ck", "ll", "ss", "x")
_PUNCT = (".", ",", "!", "?", ";", ":", "'s", "-", " (", ")", "\"", "\n")


def _synthetic_corpus(n_words: int, seed: int) -> Iterator[str]:
    """Seeded English-like lines: a fixed word list (frequent) mixed with random syllable words (rare)."""
    rng = random.Random(seed)

    def syllable_word() -> str:
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                    for _ in range(rng.randint(1, 4)))
        return w.capitalize() if rng.random() < 0.15 else w

    line: list[str] = []
    for i in range(n_words):
        r = rng.random()
        if r < 0.45:
            w = rng.choice(_WORDS)
        elif r < 0.5:
            w = str(rng.randint(0, 10 ** rng.randint(1, 5)))
        else:
            w = syllable_word()
        if rng.random() < 0.1:
            w += rng.choice(_PUNCT)
        line.append(w)
        if len(line) >= 16 or i == n_words - 1:
            yield " ".join(line)
            line = []


@functools.lru_cache(maxsize=8)
def _build_json(vocab_size: int, seed: int) -> str:
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size: {vocab_size} is below the byte-level minimum {MIN_VOCAB_SIZE}")
    extra = INST_TOKENS if vocab_size >= MIN_VOCAB_SIZE + 64 else ()
    model_size = vocab_size - len(extra)
    tok = tokenizers.Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=model_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    n_merges = model_size - MIN_VOCAB_SIZE
    tok.train_from_iterator(_synthetic_corpus(max(2000, 2 * n_merges), seed), trainer=trainer)
    data = json.loads(tok.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
    _top_up(vocab, merges, model_size)
    data["model"]["vocab"], data["model"]["merges"] = vocab, [list(m) for m in merges]
    tok = tokenizers.Tokenizer.from_str(json.dumps(data))
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in extra])
    if tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise AssertionError(f"built {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    return tok.to_str()


def _top_up(vocab: dict[str, int], merges: list[tuple[str, ...]], size: int) -> None:
    """Append merges (a, b) -> ab of existing tokens until the vocab holds exactly `size` entries."""
    if len(vocab) > size:  # never happens with BpeTrainer, but keep the contract
        raise AssertionError(f"trainer produced {len(vocab)} > {size} tokens")
    by_id = sorted(vocab, key=vocab.__getitem__)[len(SPECIAL_TOKENS):]
    letters = sorted(c for c in vocab if len(c) == 1 and c.isascii() and c.isalpha())
    if not letters and len(vocab) < size:
        raise AssertionError("no single-letter tokens to build merges from")
    i = 0
    while len(vocab) < size:  # the longest token plus a letter is always new, so this terminates
        for b in letters:
            if len(vocab) < size and by_id[i] + b not in vocab:
                vocab[by_id[i] + b] = len(vocab)
                merges.append((by_id[i], b))
                by_id.append(by_id[i] + b)
        i += 1


def build_byte_level_bpe(vocab_size: int, seed: int = 0) -> tokenizers.Tokenizer:
    """A deterministic byte-level BPE with exactly `vocab_size` ids: <unk>, <s>, </s>, 256 bytes, merges."""
    return tokenizers.Tokenizer.from_str(_build_json(vocab_size, seed))


def write_tokenizer_files(out_dir: str | Path, tok: tokenizers.Tokenizer, bos_token_id: int,
                          eos_token_id: int, model_max_length: int) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json that HF AutoTokenizer loads as-is."""
    out = Path(out_dir)
    tok = tokenizers.Tokenizer.from_str(tok.to_str())
    bos, eos = tok.id_to_token(bos_token_id), tok.id_to_token(eos_token_id)
    unk = UNK if tok.token_to_id(UNK) is not None else None
    if bos is None or eos is None:
        raise ValueError(f"bos_token_id {bos_token_id} / eos_token_id {eos_token_id} not in the vocab")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_token_id)])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    special = {"bos_token": bos, "eos_token": eos, "unk_token": unk}
    added = {str(i): {"content": t.content, "lstrip": t.lstrip, "rstrip": t.rstrip,
                      "normalized": t.normalized, "single_word": t.single_word, "special": t.special}
             for i, t in sorted(tok.get_added_tokens_decoder().items())}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": True,
              "add_eos_token": False, "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False, "legacy": False, "added_tokens_decoder": added,
              "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


# --- runtime tokenizer -----------------------------------------------------------------------------------

def _read_json(path: Path, required: bool) -> dict[str, Any] | None:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        if required:
            raise ValueError(f"{path}: file not found") from None
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return raw


def _token_id(tok: tokenizers.Tokenizer, value: Any) -> int | None:
    """An id from config.json (int or [int, ...]) or tokenizer_config.json (string or {"content": ...})."""
    if isinstance(value, list):
        value = value[0] if value else None
    if isinstance(value, dict):
        value = value.get("content")
    if isinstance(value, bool) or value is None:
        return None
    return value if isinstance(value, int) else tok.token_to_id(str(value))


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            ok = isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            if not ok:
                raise ValueError(f"{where}: only {{'type': 'text', 'text': str}} content parts are supported")
            parts.append(part["text"])
        return "\n".join(parts)
    raise ValueError(f"{where}: content must be a string or a list of text parts, "
                     f"got {type(content).__name__}")


class Tokenizer:
    """A tokenizers.Tokenizer plus the model's bos/eos ids and the Mixtral-Instruct chat format."""

    def __init__(self, tok: tokenizers.Tokenizer, bos_token_id: int, eos_token_id: int) -> None:
        self._tok = tok
        self._bos, self._eos = bos_token_id, eos_token_id
        self._bos_str = tok.id_to_token(bos_token_id) or BOS
        self._eos_str = tok.id_to_token(eos_token_id) or EOS

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        tok_file = path / "tokenizer.json"
        raw = _read_json(tok_file, required=True)
        try:
            tok = tokenizers.Tokenizer.from_str(json.dumps(raw))
        except Exception as e:  # tokenizers raises its own Exception type
            raise ValueError(f"{tok_file}: not a valid tokenizer ({e})") from None
        tok_cfg = _read_json(path / "tokenizer_config.json", required=False) or {}
        model_cfg = _read_json(path / "config.json", required=False) or {}
        ids = []
        for key, default in (("bos_token_id", BOS), ("eos_token_id", EOS)):
            tid = _token_id(tok, model_cfg.get(key))
            if tid is None:
                tid = _token_id(tok, tok_cfg.get(key.replace("_id", "")))
            if tid is None:
                tid = tok.token_to_id(default)
            if tid is None:
                raise ValueError(f"{tok_file}: no {key} (not in config.json and no {default!r} token)")
            ids.append(tid)
        return cls(tok, ids[0], ids[1])

    @property
    def bos_token_id(self) -> int:
        return self._bos

    @property
    def eos_token_id(self) -> int:
        return self._eos

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._tok

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self._bos, *ids] if add_bos else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        """`<s>[INST] {user} [/INST]{assistant}</s>[INST] {user2} [/INST]`, as Mixtral-Instruct's template."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages: expected a non-empty list of {'role', 'content'} dicts")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}]: expected a dict with 'role' and 'content'")
        system = None
        turns = messages
        if messages[0]["role"] == "system":
            system, turns = _text(messages[0]["content"], "messages[0]"), messages[1:]
        offset = len(messages) - len(turns)
        out = [self._bos_str]
        for i, m in enumerate(turns):
            role, where = m["role"], f"messages[{i + offset}]"
            if role not in ("user", "assistant"):
                raise ValueError(f"{where}: role {role!r} is not supported (only an initial 'system', then "
                                 "'user' and 'assistant')")
            expected = "user" if i % 2 == 0 else "assistant"
            if role != expected:
                raise ValueError(f"{where}: expected role {expected!r}, got {role!r}; after the optional "
                                 "system message, roles must alternate user/assistant/user/...")
            text = _text(m["content"], where)
            if role == "user":
                if i == 0 and system is not None:
                    text = system + "\n\n" + text
                out.append(f"[INST] {text} [/INST]")
            else:
                out.append(text + self._eos_str)
        return "".join(out)

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True) -> list[int]:
        # Mixtral has no separate generation prompt: a trailing "[/INST]" already asks for the answer.
        del add_generation_prompt
        return self._tok.encode(self.render_chat(messages), add_special_tokens=False).ids


class IncrementalDecoder:
    """Streaming detokenizer: step(id) returns only newly completed text, holding back partial UTF-8."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Iterable[int] | None = None,
                 skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids = list(prompt_ids or [])
        # Decode from a few tokens of context so merges across the boundary (e.g. a leading space) survive.
        self._prefix = max(0, len(self._ids) - 5)
        self._read = len(self._ids)

    def step(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        new_text = self._tok.decode(self._ids[self._prefix:], self._skip)
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        """Whatever is still held back (e.g. a truncated UTF-8 sequence) at the end of generation."""
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        new_text = self._tok.decode(self._ids[self._prefix:], self._skip)
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text):]
