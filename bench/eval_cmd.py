"""`expertmesh eval passkey`: flags parsed and checked here, so a bad value exits 2 naming its flag."""

from __future__ import annotations

import math
import os
import sys
from typing import Any

from .output_paths import check_output_paths
from .passkey import PasskeyConfig, format_report, plot_passkey, run_passkey

API_KEY_ENV = "EXPERTMESH_API_KEY"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("eval", help="evaluate a served model (passkey retrieval)",
                       description="Evaluations run against an OpenAI-compatible server.")
    tasks = p.add_subparsers(dest="eval_task", required=True, metavar="TASK")
    pk = tasks.add_parser("passkey", help="passkey retrieval accuracy per context length and depth",
                          description="Hide a five-digit pass key at each depth of filler text of each length "
                                      "(in the model's tokens), ask for it greedily, report accuracy per length "
                                      "and depth (the Mixtral paper's Figure 4).")
    pk.add_argument("--base-url", required=True, metavar="URL", help="server root, e.g. http://127.0.0.1:8000")
    pk.add_argument("--model", metavar="NAME", help="model name (default: the first of /v1/models)")
    pk.add_argument("--api-key", metavar="KEY",
                    help=f"sent as Authorization: Bearer KEY; prefer the {API_KEY_ENV} environment variable, "
                         "which keeps the key out of the process list")
    pk.add_argument("--lengths", default="1000,4000,16000,32000", metavar="N,N,...",
                    help="prompt lengths in the model's tokens (default 1000,4000,16000,32000)")
    pk.add_argument("--depths", default="0,0.25,0.5,0.75,1", metavar="D,D,...",
                    help="where the key sits, 0 = start .. 1 = end (default 0,0.25,0.5,0.75,1)")
    pk.add_argument("--trials", default="1", metavar="N", help="keys per (length, depth) (default 1)")
    pk.add_argument("--seed", default="0", metavar="S", help="seeds the keys (default 0)")
    pk.add_argument("--tokenizer", metavar="DIR",
                    help="count tokens with this checkpoint's tokenizer.json (default: the server's /tokenize)")
    pk.add_argument("--chat", action="store_true", help="ask through /v1/chat/completions (prompt as user turn)")
    pk.add_argument("--result-file", required=True, metavar="R.json", help="write accuracy and every answer")
    pk.add_argument("--plot", metavar="P.png", help="write a length x depth accuracy heatmap")
    pk.set_defaults(run=run)


def _list(text: str, flag: str, kind: type) -> tuple[Any, ...]:
    try:
        values = tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError:
        noun = "integers" if kind is int else "numbers"
        raise ValueError(f"{flag}: expected comma-separated {noun}, got {text!r}") from None
    if not values or (kind is float and not all(math.isfinite(v) for v in values)):
        raise ValueError(f"{flag}: expected comma-separated {'integers' if kind is int else 'numbers'}, "
                         f"got {text!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{flag}: repeated value in {text!r}")
    return values


def _int(text: str, flag: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{flag}: expected an integer, got {text!r}") from None


def config_from_args(args: Any) -> PasskeyConfig:
    if args.tokenizer and not os.path.isfile(os.path.join(args.tokenizer, "tokenizer.json")):
        raise ValueError(f"--tokenizer: no tokenizer.json in {args.tokenizer!r}")
    cfg = PasskeyConfig(base_url=args.base_url, lengths=_list(args.lengths, "--lengths", int),
                        depths=_list(args.depths, "--depths", float), trials=_int(args.trials, "--trials"),
                        seed=_int(args.seed, "--seed"), model=args.model,
                        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None, tokenizer=args.tokenizer,
                        chat=args.chat)
    cfg.validate()
    return cfg


def run(args: Any) -> int:
    cfg = config_from_args(args)
    check_output_paths(args.result_file, args.plot)
    if args.plot:
        import matplotlib  # noqa: F401  (fail on a missing matplotlib before the run, not after)
    result = run_passkey(cfg)
    print(format_report(result))
    result.save(args.result_file, getattr(args, "argv", None))
    print(f"wrote {args.result_file}", file=sys.stderr)
    if args.plot and result.results:
        plot_passkey(result, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    if result.error:
        print(f"expertmesh eval passkey: stopped after {len(result.results)} answers: {result.error}", file=sys.stderr)
        return 1
    return 130 if result.interrupted else 0
