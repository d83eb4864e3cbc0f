"""Which token a client sends (issue 11): ``Authorization: Bearer hdr_<id>_<secret>``.

Precedence, first found wins:

1. a token given to the client (``HerderClient(token=…)``; the CLI's
   ``herder --token …``, which sets ``HERDER_TOKEN`` for the command);
2. the ``HERDER_TOKEN`` environment variable;
3. the file named by ``HERDER_TOKEN_FILE``;
4. ``$XDG_CONFIG_HOME/herder/token`` (default ``~/.config/herder/token``).

A file holds the token on its first line; it should be readable by its
owner only (``chmod 600``), like an SSH key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

TOKEN_ENV = "HERDER_TOKEN"
TOKEN_FILE_ENV = "HERDER_TOKEN_FILE"


class TokenFileError(ValueError):
    """The token file named by HERDER_TOKEN_FILE cannot be read."""


def default_token_file(env: Mapping[str, str] | None = None) -> Path:
    source = os.environ if env is None else env
    base = source.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "herder" / "token"


def _first_line(path: Path) -> str | None:
    text = path.read_text(encoding="utf-8", errors="replace")
    line = text.strip().splitlines()[0].strip() if text.strip() else ""
    return line or None


def default_token(env: Mapping[str, str] | None = None) -> str | None:
    """The token a client sends when it is given none (see the module's precedence)."""
    source = os.environ if env is None else env
    value = source.get(TOKEN_ENV, "").strip()
    if value:
        return value
    named = source.get(TOKEN_FILE_ENV, "").strip()
    if named:
        try:
            return _first_line(Path(named).expanduser())
        except OSError as exc:
            raise TokenFileError(
                f"{TOKEN_FILE_ENV}={named}: cannot read the token file ({exc.strerror})"
            ) from None
    path = default_token_file(source)
    try:
        return _first_line(path)
    except OSError:  # no default file: no token
        return None
