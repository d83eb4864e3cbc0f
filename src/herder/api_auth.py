"""Wire models of users, tokens and who a request acts as (issue 11, DESIGN §11)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from herder.api_base import _In, _Out
from herder.api_models import AgentView

UserRole = Literal["admin", "submitter", "viewer"]
USER_NAME = r"^[A-Za-z0-9_.@-]{1,100}$"
#: The longest a token may live (ten years): past it a timestamp overflows nothing.
MAX_EXPIRES_S = 10 * 366 * 86400


class UserCreate(_In):
    name: str = Field(pattern=USER_NAME, description="letters, digits and _.@-")
    role: UserRole


class UserView(_Out):
    name: str
    role: str
    created_at: datetime
    disabled: bool = False


class UserList(_Out):
    users: list[UserView]


class TokenCreate(_In):
    user: str | None = Field(
        default=None, pattern=USER_NAME, description="the user it acts as (omit with join)"
    )
    join: bool = Field(default=False, description="a join token: it only registers new agents")
    expires_s: float | None = Field(
        default=None, gt=0, le=MAX_EXPIRES_S, description="lifetime in seconds; none: no expiry"
    )
    description: str | None = Field(default=None, max_length=200)


class TokenView(_Out):
    """A token without its secret (which only its creation answer carries)."""

    id: str
    kind: Literal["user", "join", "agent"]
    user: str | None = None
    agent_id: str | None = None
    created_at: datetime
    created_by: str | None = None
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    description: str | None = None


class TokenCreated(TokenView):
    token: str = Field(description="hdr_<id>_<secret>: shown this once, stored only hashed")


class TokenList(_Out):
    tokens: list[TokenView]


class WhoAmI(_Out):
    kind: Literal["user", "agent", "join", "insecure"]
    role: str
    user: str | None = None
    agent_id: str | None = None
    token_id: str | None = None
    expires_at: datetime | None = None


class AgentRegistered(AgentView):
    """The answer to ``POST /api/v1/agents``: the agent, and its own token when it joined."""

    token: str | None = Field(
        default=None,
        description="the agent's own API token (hdr_…), on a registration with a join "
        "token only: the agent keeps it in its state dir and uses it from then on",
    )
