"""`expertmesh` command line: checkpoint, generate, serve, loadtest, bench, eval."""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import entry_points

# The shared flag types live in the leaf module cli_args (serve_cmd uses them too); still importable from here.
from .cli_args import DTYPE_CHOICES, non_negative_float, positive_int


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, PermissionError) as e:
        print(f"expertmesh {args.command}: error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="expertmesh", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    _checkpoint_parser(sub)
    _generate_parser(sub)
    from . import serve_cmd

    serve_cmd.add_parser(sub)
    # Commands of the packages above cluster (bench: loadtest, bench, eval) register as entry points, so the control
    # plane does not import them.
    for ep in sorted(entry_points(group="expertmesh.commands"), key=lambda e: e.name):
        ep.load()(sub)
    return p


def _checkpoint_parser(sub) -> None:
    from model.random_checkpoint import PRESETS

    p = sub.add_parser("checkpoint", help="write a random checkpoint in the exact HF Mixtral layout")
    p.add_argument("--preset", choices=list(PRESETS), default="tiny")
    p.add_argument("--out", required=True, help="output directory (new or empty)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32")
    p.add_argument("--router-skew", type=non_negative_float, default=0.0,
                   help="Zipf-like exponent: a few experts get most tokens (0 = uniform)")
    p.add_argument("--max-position-embeddings", type=positive_int, default=None, metavar="N",
                   help="override the preset's context length (tiny: 512, bench: 4096), e.g. 32768 for passkey")
    p.add_argument("--force", action="store_true", help="write very large checkpoints (mixtral-8x7b)")
    p.set_defaults(run=_run_checkpoint)


def _run_checkpoint(args) -> int:
    from model.random_checkpoint import build_config, checkpoint_size_bytes, write_checkpoint

    overrides = {} if args.max_position_embeddings is None else {
        "max_position_embeddings": args.max_position_embeddings}
    size = checkpoint_size_bytes(build_config(args.preset, args.dtype, overrides), args.dtype)
    print(f"writing {args.preset} checkpoint ({size / 1e9:.2f} GB, {args.dtype}) to {args.out}", file=sys.stderr)
    path = write_checkpoint(args.out, args.preset, args.seed, args.dtype, args.router_skew, args.force,
                            overrides=overrides)
    print(path)
    return 0


def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate from a prompt, in-process or through expert workers")
    p.add_argument("--model", required=True, help="checkpoint directory (HF layout)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (BOS added)")
    src.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--max-tokens", type=positive_int, default=32)
    p.add_argument("--temperature", type=non_negative_float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32")
    p.add_argument("--json", action="store_true", help='print {"token_ids": [...], "text": "..."}')
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=positive_int, help="run the experts in N Ray actors over gRPC")
    where.add_argument("--local", action="store_true", help="run everything in this process (default)")
    p.add_argument("--address", help="Ray cluster address (default: embedded local Ray)")
    p.add_argument("--placement", choices=["contiguous", "round-robin"], default="contiguous")
    p.add_argument("--bind-host", default="0.0.0.0", help="interface the expert workers bind (with --workers)")
    p.set_defaults(run=_run_generate)


def parse_prompt_ids(text: str, vocab_size: int) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--prompt-ids: expected comma-separated integers, got {text!r}") from None
    if not ids:
        raise ValueError("--prompt-ids: no token ids given")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"--prompt-ids: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return ids


def _run_generate(args) -> int:
    from model.config import MixtralConfig
    from model.sampling import SamplingParams
    from model.tokenizer import Tokenizer

    cfg = MixtralConfig.from_file(args.model)
    tok = Tokenizer.from_dir(args.model)
    ids = parse_prompt_ids(args.prompt_ids, cfg.vocab_size) if args.prompt_ids else tok.encode(args.prompt)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos)
    params.validate()
    if args.workers:
        import ray

        from .deployment import ClusterConfig, ExpertCluster

        with ExpertCluster(ClusterConfig(args.model, args.workers, args.dtype, args.placement,
                                         address=args.address, bind_host=args.bind_host)) as cluster:
            out, _ = ray.get(cluster.router.generate.remote([ids], params))
    else:
        from model.generation import generate
        from model.mixtral import Mixtral

        out, _ = generate(Mixtral.from_pretrained(args.model, dtype=args.dtype), [ids], params)
    text = tok.decode(out[0])
    if args.json:
        print(json.dumps({"token_ids": out[0], "text": text}))
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
