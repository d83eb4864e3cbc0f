"""The agent's API token (issue 11): joined once, kept in its state dir, used after restarts.

An agent starts with, first found: the token it was given at its last
registration (``<state dir>/agent-token``, mode 0600), else ``AgentConfig.token``,
else its join token (``--join-token``/``HERDER_JOIN_TOKEN``), else whatever
the client library finds (``HERDER_TOKEN``, the token files:
``herder.client.auth``). A registration with a join token is answered with
the agent's own token, which replaces the join token at once and is saved.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Literal

TOKEN_FILE = "agent-token"
Source = Literal["state", "config", "join", "default"]


def token_path(state_dir: Path) -> Path:
    return Path(state_dir) / TOKEN_FILE


def load_agent_token(state_dir: Path) -> str | None:
    try:
        text = token_path(state_dir).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return text or None


def save_agent_token(state_dir: Path, token: str) -> None:
    """Write the token readable by the agent's user only (0600), atomically."""
    path = token_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(TOKEN_FILE + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def forget_agent_token(state_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        token_path(state_dir).unlink()


def initial_token(
    state_dir: Path, token: str | None, join_token: str | None
) -> tuple[str | None, Source]:
    """The token to start with, and where it came from (see the module's order)."""
    saved = load_agent_token(state_dir)
    if saved:
        return saved, "state"
    if token:
        return token, "config"
    if join_token:
        return join_token, "join"
    return None, "default"


def use_token(client: Any, token: str | None) -> None:
    """Make ``client`` send ``token`` from now on (a HerderClient, or the agent's
    ModalClient with its HTTP client and its probe); other clients (the embedded
    farm's in-process one) need none."""
    for c in (client, getattr(client, "http", None), getattr(client, "_probe", None)):
        setter = getattr(c, "set_token", None)
        if callable(setter):
            setter(token)
