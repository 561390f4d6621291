"""The `expertmesh` CLI: checkpoint and generate, in-process and through workers, and clear errors for bad flags."""

import json
import subprocess
import sys

import pytest

from cluster.cli import main
from model.generation import generate
from model.mixtral import Mixtral
from model.sampling import SamplingParams
from model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "ck"
    assert main(["checkpoint", "--preset", "tiny", "--out", str(out), "--seed", "4"]) == 0
    return out


def test_checkpoint_max_position_embeddings_flag(tmp_path, capsys):
    """--max-position-embeddings lands in config.json and the tokenizer's model_max_length; other fields keep the
    preset's values."""
    out = tmp_path / "long"
    assert main(["checkpoint", "--preset", "tiny", "--max-position-embeddings", "32768", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["max_position_embeddings"] == 32768 and cfg["hidden_size"] == 64
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 32768
    assert main(["checkpoint", "--preset", "tiny", "--out", str(tmp_path / "short")]) == 0
    assert json.loads((tmp_path / "short" / "config.json").read_text())["max_position_embeddings"] == 512


@pytest.mark.parametrize("value", ["0", "-5", "1.5", "many"])
def test_checkpoint_bad_max_position_embeddings_is_a_clear_error(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["checkpoint", "--out", str(tmp_path / "x"), "--max-position-embeddings", value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"--max-position-embeddings: expected a positive integer, got '{value}'" in err
    assert not (tmp_path / "x").exists()


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_generate_json_is_the_in_process_model(ck, capsys):
    got = run_json(capsys, ["generate", "--model", str(ck), "--prompt", "Hello experts", "--max-tokens", "9",
                            "--ignore-eos", "--json"])
    tok = Tokenizer.from_dir(ck)
    want, _ = generate(Mixtral.from_pretrained(ck), [tok.encode("Hello experts")],
                       SamplingParams(max_tokens=9, ignore_eos=True))
    assert got == {"token_ids": want[0], "text": tok.decode(want[0])}


def test_generate_through_workers_equals_local(ck, capsys, ray_session):
    argv = ["generate", "--model", str(ck), "--prompt-ids", "1,5,9,200", "--max-tokens", "8", "--ignore-eos",
            "--json"]
    local = run_json(capsys, [*argv, "--local"])
    remote = run_json(capsys, [*argv, "--workers", "2"])
    assert remote == local and len(local["token_ids"]) == 8


def test_sampling_with_seed_is_reproducible(ck, capsys):
    argv = ["generate", "--model", str(ck), "--prompt", "x", "--max-tokens", "12", "--temperature", "0.9",
            "--top-p", "0.8", "--top-k", "50", "--seed", "7", "--ignore-eos", "--json"]
    assert run_json(capsys, argv) == run_json(capsys, argv)


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "{ck}", "--prompt-ids", "1,x"], "--prompt-ids: expected comma-separated integers"),
    (["generate", "--model", "{ck}", "--prompt-ids", "1,99999"], "token id 99999 is outside the vocabulary"),
    (["generate", "--model", "{ck}", "--prompt", "a", "--workers", "9"], "9 workers for 8 experts"),
    (["generate", "--model", "{ck}", "--prompt", "a", "--top-p", "0"], "top_p"),
    (["generate", "--model", "{ck}/missing", "--prompt", "a"], "config.json not found"),
    (["checkpoint", "--out", "{ck}"], "not an empty directory"),
    (["checkpoint", "--preset", "mixtral-8x7b", "--out", "{tmp}/big"], "GB"),
])
def test_bad_input_is_a_clear_error(ck, tmp_path, capsys, argv, message):
    argv = [a.format(ck=ck, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [
    ["generate", "--model", "m", "--prompt", "a", "--max-tokens", "0"],
    ["generate", "--model", "m", "--prompt", "a", "--workers", "0"],
    ["generate", "--model", "m", "--prompt", "a", "--prompt-ids", "1"],
    ["checkpoint", "--preset", "huge", "--out", "x"],
    ["checkpoint", "--out", "x", "--router-skew", "-1"],
    ["checkpoint", "--out", "x", "--dtype", "int8"],
])
def test_bad_flags_rejected_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_flag_types_live_in_a_leaf_module():
    """cli imports serve_cmd, so serve_cmd must not import cli: the shared flag types are in cluster.cli_args,
    which imports nothing from cluster (and cluster.cli still exports them)."""
    code = ("import json, sys, cluster.cli_args, cluster.serve_cmd; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('cluster'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == ["cluster", "cluster.autoscale", "cluster.cli_args", "cluster.rebalance_flags",
                                      "cluster.serve_cmd", "cluster.serve_lifecycle", "cluster.serve_secrets"]
    import cluster.cli
    import cluster.cli_args

    assert (cluster.cli.positive_int, cluster.cli.non_negative_float, cluster.cli.DTYPE_CHOICES) == (
        cluster.cli_args.positive_int, cluster.cli_args.non_negative_float, cluster.cli_args.DTYPE_CHOICES)
