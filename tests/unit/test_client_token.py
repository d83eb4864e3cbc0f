"""Which token a client sends (herder.client.auth), and the agent's saved token
(herder.agent.credentials): the documented precedence, file modes, errors."""

from __future__ import annotations

import stat
from pathlib import Path

import httpx
import pytest

from herder.agent.credentials import (
    initial_token,
    load_agent_token,
    save_agent_token,
    use_token,
)
from herder.client import HerderClient, NotFoundError
from herder.client.auth import TokenFileError, default_token


def test_precedence_env_then_named_file_then_default_file(tmp_path: Path) -> None:
    named = tmp_path / "named"
    named.write_text("hdr_named\n")
    conf = tmp_path / "conf"
    (conf / "herder").mkdir(parents=True)
    (conf / "herder" / "token").write_text("  hdr_default  \nsecond line\n")
    env = {"HERDER_TOKEN": "hdr_env", "HERDER_TOKEN_FILE": str(named), "XDG_CONFIG_HOME": str(conf)}
    assert default_token(env) == "hdr_env"
    env.pop("HERDER_TOKEN")
    assert default_token(env) == "hdr_named"
    env.pop("HERDER_TOKEN_FILE")
    assert default_token(env) == "hdr_default"
    assert default_token({"XDG_CONFIG_HOME": str(tmp_path / "none")}) is None


def test_a_missing_named_token_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match=r"HERDER_TOKEN_FILE=.*cannot read the token file"):
        default_token({"HERDER_TOKEN_FILE": str(tmp_path / "missing")})


def test_client_sends_given_token_over_env_and_can_change_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(404, json={"error": "not_found", "message": "no"})

    monkeypatch.setenv("HERDER_TOKEN", "hdr_from_env")
    transport = httpx.MockTransport(handler)
    for given, want in (
        ("hdr_given", "Bearer hdr_given"),
        (None, "Bearer hdr_from_env"),
        ("", None),
    ):
        with HerderClient("http://m:1", transport=transport, token=given) as c:
            with pytest.raises(NotFoundError):
                c.get_job(1)
            assert seen[-1] == want, given
    with HerderClient("http://m:1", transport=transport, token="hdr_a") as c:
        use_token(c, "hdr_b")
        with pytest.raises(NotFoundError):
            c.get_job(1)
        assert seen[-1] == "Bearer hdr_b"


def test_agent_token_file_is_private_and_preferred(tmp_path: Path) -> None:
    assert initial_token(tmp_path, "hdr_cfg", "hdr_join") == ("hdr_cfg", "config")
    assert initial_token(tmp_path, None, "hdr_join") == ("hdr_join", "join")
    assert initial_token(tmp_path, None, None) == (None, "default")
    save_agent_token(tmp_path / "state", "hdr_own")
    path = tmp_path / "state" / "agent-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_agent_token(tmp_path / "state") == "hdr_own"
    assert initial_token(tmp_path / "state", "hdr_cfg", "hdr_join") == ("hdr_own", "state")
    save_agent_token(tmp_path / "state", "hdr_newer")  # replaced atomically, still 0600
    assert load_agent_token(tmp_path / "state") == "hdr_newer"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
