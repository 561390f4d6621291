"""`loadtest` takes the API key from $EXPERTMESH_API_KEY when --api-key is not given (as `eval` does)."""

from __future__ import annotations

import json

import pytest

from cluster.cli import build_parser, main
from model.mixtral import Mixtral
from model.random_checkpoint import write_checkpoint
from model.tokenizer import Tokenizer
from router.api import build_app
from router.engine import AsyncEngine, Engine
from router.scheduler import EngineConfig
from router.server import HttpThread

KEY = "sk-loadtest-env"


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    ck = write_checkpoint(tmp_path_factory.mktemp("lt_key"), "tiny", 0, "float32")
    engine = AsyncEngine(Engine(Mixtral.from_pretrained(ck), EngineConfig(num_kv_blocks=128)))
    http = HttpThread(build_app(engine, Tokenizer.from_dir(ck), "tiny", api_key=KEY), "127.0.0.1", 0,
                      graceful_s=0.1, log_level="critical")
    yield f"http://127.0.0.1:{http.start(timeout_s=10)}", ck
    http.stop()
    engine.shutdown(drain=False)


def run(url: str, ck, out, *flags) -> dict:
    assert main(["loadtest", "--no-progress", "--base-url", url, "--model", "tiny", "--tokenizer", str(ck),
                 "--num-prompts", "3", "--input-len", "4", "--output-len", "2", "--result-file", str(out),
                 *flags]) == 0
    return json.loads(out.read_text())


def test_api_key_from_the_environment(keyed_server, tmp_path, monkeypatch):
    url, ck = keyed_server
    monkeypatch.delenv("EXPERTMESH_API_KEY", raising=False)
    r = run(url, ck, tmp_path / "none.json")
    assert (r["completed"], r["failure_reasons"]) == (0, {"HTTP 401": 3})  # the server does want a key
    monkeypatch.setenv("EXPERTMESH_API_KEY", KEY)
    r = run(url, ck, tmp_path / "env.json")
    assert (r["completed"], r["failed"]) == (3, 0)
    r = run(url, ck, tmp_path / "flag.json", "--api-key", "wrong")  # the flag, when given, wins
    assert (r["completed"], r["failure_reasons"]) == (0, {"HTTP 401": 3})


def test_help_says_where_the_key_comes_from():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    help_text = " ".join(sub.choices["loadtest"].format_help().split())
    assert "--api-key KEY sent as Authorization: Bearer KEY (default: $EXPERTMESH_API_KEY" in help_text
