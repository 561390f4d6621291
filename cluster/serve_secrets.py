"""`serve`'s secrets: the API key (never in argv, logs or printed hints) and the data plane's secret and TLS."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

API_KEY_ENV = "EXPERTMESH_API_KEY"
API_KEY_FD_ENV = "EXPERTMESH_API_KEY_FD"  # parent -> child: a pipe holding the key given by --api-key
CURL_AUTH_HINT = ' -H "Authorization: Bearer $EXPERTMESH_API_KEY"'  # literal: the shell expands it, we never print it
ARGV_WARNING = (f"expertmesh serve: warning: --api-key shows the key to every user of this machine (`ps`); "
                f"use ${API_KEY_ENV} or --api-key-file")


def add_flags(p) -> None:
    p.add_argument("--api-key", help=f"deprecated (it shows in `ps`): use ${API_KEY_ENV} or --api-key-file")
    p.add_argument("--api-key-file", metavar="PATH", help=f"file holding the API key (default: ${API_KEY_ENV})")
    p.add_argument("--metrics-auth", action="store_true", help="require the API key on /metrics too")
    p.add_argument("--bind-host", default="0.0.0.0",
                   help="interface the expert workers' gRPC and metrics servers bind (default all; they advertise "
                        "their node's IP)")
    p.add_argument("--grpc-tls-cert", metavar="PEM", help="TLS between router and workers: certificate")
    p.add_argument("--grpc-tls-key", metavar="PEM", help="private key of --grpc-tls-cert")
    p.add_argument("--grpc-tls-ca", metavar="PEM",
                   help="CA for mutual TLS (both ends present --grpc-tls-cert, signed by it)")
    p.add_argument("--grpc-tls-server-name", metavar="NAME",
                   help="name the router expects in the workers' certificate (default: the worker's IP)")


def curl_auth_hint(args) -> str:
    """The Authorization header of serve's printed curl hint: a shell expression that yields the key, never the
    key itself (from --api-key-file PATH: `$(cat PATH)`; otherwise $EXPERTMESH_API_KEY)."""
    if args.api_key_file:
        return f' -H "Authorization: Bearer $(cat {shlex.quote(os.path.abspath(args.api_key_file))})"'
    return CURL_AUTH_HINT


def strip_api_key(argv: list[str]) -> tuple[list[str], str | None]:
    """argv without `--api-key KEY` / `--api-key=KEY`, and the key (the last one given)."""
    out, key, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--api-key" and i + 1 < len(argv):
            key, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--api-key="):
            key = arg.split("=", 1)[1]
        else:
            out.append(arg)
        i += 1
    return out, key


def child_argv_env(argv: list[str], env: dict[str, str]) -> tuple[list[str], dict[str, str], tuple[int, ...]]:
    """What the serve parent gives its child (argv, env, fds to pass): a key given by --api-key (warned about)
    leaves argv and goes through a pipe, so it is in neither the child's argv nor its environ."""
    argv, key = strip_api_key(argv)
    if key is None:
        return argv, env, ()
    print(ARGV_WARNING, file=sys.stderr, flush=True)
    read_fd, write_fd = os.pipe()
    with os.fdopen(write_fd, "w") as w:  # a key is far below the pipe's buffer: this never blocks
        w.write(key)
    return argv, {**env, API_KEY_FD_ENV: str(read_fd)}, (read_fd,)


def resolve_api_key(args) -> str | None:
    """--api-key-file, else --api-key (in-process callers), else $EXPERTMESH_API_KEY, which is removed from this
    process's environment so that Ray's processes, started from here, do not inherit it."""
    from_env = os.environ.pop(API_KEY_ENV, None)
    fd = os.environ.pop(API_KEY_FD_ENV, None)
    if fd is not None:
        with os.fdopen(int(fd)) as r:
            from_env = r.read()
    if args.api_key_file:
        if args.api_key:
            raise ValueError("--api-key and --api-key-file: give one")
        try:
            key = Path(args.api_key_file).read_text().strip()
        except OSError as e:
            raise ValueError(f"--api-key-file: cannot read {args.api_key_file}: {e.strerror}") from None
        if not key:
            raise ValueError(f"--api-key-file: {args.api_key_file} is empty")
        return key
    return args.api_key or from_env or None


def data_plane_security(args):
    """The deployment's fresh secret, with the TLS material the --grpc-tls-* files hold (read here, by the
    driver, and handed to the actors as bytes)."""
    from protos.security import DataPlaneSecurity

    return DataPlaneSecurity.from_files(args.grpc_tls_cert, args.grpc_tls_key, args.grpc_tls_ca,
                                        args.grpc_tls_server_name)
