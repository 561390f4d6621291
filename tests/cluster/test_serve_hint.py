"""serve's printed curl hint authenticates through the shell (the key's file or variable), never showing the key."""

import subprocess
from types import SimpleNamespace

from cluster.serve_secrets import curl_auth_hint


def shell_words(fragment: str, env: dict[str, str] | None = None) -> list[str]:
    """The words bash makes of a hint fragment, one per line (what curl would get as argv)."""
    out = subprocess.run(["bash", "-c", f"printf '%s\\n' {fragment}"], capture_output=True, text=True, check=True,
                         env=env)
    return out.stdout.splitlines()


def test_key_file_hint_reads_the_file_in_the_shell(tmp_path):
    key = "sk-hint-" + "x" * 24
    path = tmp_path / "odd dir's" / "api key"
    path.parent.mkdir()
    path.write_text(key + "\n")
    hint = curl_auth_hint(SimpleNamespace(api_key_file=str(path)))
    assert key not in hint and "$(cat " in hint and "EXPERTMESH_API_KEY" not in hint
    assert shell_words(hint) == ["-H", f"Authorization: Bearer {key}"]


def test_env_hint_names_the_variable():
    hint = curl_auth_hint(SimpleNamespace(api_key_file=None))
    assert hint == ' -H "Authorization: Bearer $EXPERTMESH_API_KEY"'
    assert shell_words(hint, {"EXPERTMESH_API_KEY": "k1"}) == ["-H", "Authorization: Bearer k1"]
