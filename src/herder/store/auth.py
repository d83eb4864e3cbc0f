"""Users and API tokens in the database (issue 11, DESIGN §11).

A token reads ``hdr_<id>_<secret>``: ``id`` finds its row (one primary-key
lookup), and the sha256 of ``secret`` is compared with the stored hash in
constant time (``hmac.compare_digest``). The secret itself is never stored;
it is shown once, when the token is made.

Kinds of token: ``user`` (acts as a user with the user's role), ``join``
(only registers new agents, DESIGN §11 "joined with a join token") and
``agent`` (made at registration; acts as that one agent only).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from herder.api_auth import TokenView, UserView
from herder.api_models import AttemptView
from herder.errors import Conflict, HerderError, NotFound
from herder.store import views
from herder.store.schema import agents, attempts, jobs, tokens, users
from herder.store.tx import StoreBase, _Tx

PREFIX = "hdr"
_TOKEN_RE = re.compile(r"^hdr_([0-9a-f]{12})_([A-Za-z0-9_-]{20,100})$")
NAME_PATTERN = r"^[A-Za-z0-9_.@-]{1,100}$"

TokenKind = Literal["user", "join", "agent"]


class Role(StrEnum):
    ADMIN = "admin"
    SUBMITTER = "submitter"
    VIEWER = "viewer"
    # Not users' roles: what agent and join tokens act as.
    AGENT = "agent"
    AGENT_JOIN = "agent-join"


USER_ROLES = (Role.ADMIN.value, Role.SUBMITTER.value, Role.VIEWER.value)


class AuthFailure(HerderError):
    """A token that is missing, malformed, unknown, tampered with, expired or revoked (401)."""

    code = "unauthorized"
    status = 401


class Forbidden(HerderError):
    """A valid token whose role does not allow the request (403)."""

    code = "forbidden"
    status = 403


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: a user, an agent, a join token, or nobody checked (insecure)."""

    kind: Literal["user", "agent", "join", "insecure"]
    role: str
    name: str | None = None  # the user's name (kind user)
    agent_id: str | None = None  # kind agent
    token_id: str | None = None
    expires_at: datetime | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == Role.ADMIN.value or self.kind == "insecure"


#: What a master that checks nothing acts as (``--insecure-no-auth``).
INSECURE = Principal(kind="insecure", role=Role.ADMIN.value)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_token(token: str) -> tuple[str, str]:
    """``(id, secret)`` of ``hdr_<id>_<secret>``; AuthFailure for anything else."""
    m = _TOKEN_RE.match(token)
    if m is None:
        raise AuthFailure("malformed token: expected hdr_<id>_<secret>")
    return m.group(1), m.group(2)


def new_token() -> tuple[str, str, str]:
    """``(id, secret, full token)`` of a fresh token."""
    token_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return token_id, secret, f"{PREFIX}_{token_id}_{secret}"


def _token_view(r: Any) -> TokenView:
    return TokenView(
        id=r.id,
        kind=r.kind,
        user=r.user_name,
        agent_id=r.agent_id,
        created_at=r.created_at,
        created_by=r.created_by,
        expires_at=r.expires_at,
        revoked_at=r.revoked_at,
        description=r.description,
    )


def _user_view(r: Any) -> UserView:
    return UserView(name=r.name, role=r.role, created_at=r.created_at, disabled=r.disabled)


class AuthStore:
    """Users, tokens and the reads authorization needs, over a :class:`herder.store.Store`.

    Each method is one transaction of the store's own (``_read``/``_write``),
    so SQLite's single writer and PostgreSQL's retries apply as everywhere.
    """

    def __init__(self, store: StoreBase) -> None:
        self.store = store

    # ----------------------------------------------------------------- users

    def add_user(self, name: str, role: str) -> UserView:
        if role not in USER_ROLES:
            raise HerderError(f"role {role!r}: expected one of {', '.join(USER_ROLES)}")
        if not re.match(NAME_PATTERN, name):
            raise HerderError(f"user name {name!r}: letters, digits and _.@- only, 1-100")

        def tx(t: _Tx) -> Any:
            ins = self.store._insert_ignore(users).values(
                name=name, role=role, created_at=t.now, disabled=False
            )
            if t.conn.execute(ins.returning(users.c.name)).first() is None:
                raise Conflict(f"user {name!r} already exists")
            return t.conn.execute(sa.select(users).where(users.c.name == name)).one()

        return _user_view(self.store._write(tx))

    def list_users(self) -> list[UserView]:
        def q(conn: Connection) -> list[UserView]:
            rows = conn.execute(sa.select(users).order_by(users.c.name)).all()
            return [_user_view(r) for r in rows]

        return self.store._read(q)

    def remove_user(self, name: str) -> None:
        """Remove a user and every token of theirs (one transaction); their jobs stay."""

        def tx(t: _Tx) -> None:
            t.conn.execute(sa.delete(tokens).where(tokens.c.user_name == name))
            gone = t.conn.execute(
                sa.delete(users).where(users.c.name == name).returning(users.c.name)
            ).first()
            if gone is None:
                raise NotFound(f"no user {name!r}")

        self.store._write(tx)

    # ---------------------------------------------------------------- tokens

    def create_token(
        self,
        kind: TokenKind,
        *,
        user: str | None = None,
        agent_id: str | None = None,
        expires_s: float | None = None,
        description: str | None = None,
        created_by: str | None = None,
    ) -> tuple[TokenView, str]:
        """A new token and its secret (the only time the secret is known)."""
        if (kind == "user") != (user is not None):
            raise HerderError("a user token needs a user; join and agent tokens have none")
        if (kind == "agent") != (agent_id is not None):
            raise HerderError("an agent token needs an agent id")
        if expires_s is not None and expires_s <= 0:
            raise HerderError("expires: must be positive")
        token_id, secret, full = new_token()

        def tx(t: _Tx) -> Any:
            if user is not None:
                found = t.conn.execute(
                    sa.select(users.c.disabled).where(users.c.name == user)
                ).first()
                if found is None:
                    raise NotFound(f"no user {user!r}")
            values = {
                "id": token_id,
                "kind": kind,
                "user_name": user,
                "agent_id": agent_id,
                "secret_sha256": hash_secret(secret),
                "created_at": t.now,
                "created_by": created_by,
                "expires_at": t.now + timedelta(seconds=expires_s) if expires_s else None,
                "description": description,
            }
            # ON CONFLICT DO NOTHING covers the partial unique index too: an agent
            # that holds a live token already gets no second one.
            ins = self.store._insert_ignore(tokens).values(**values).returning(tokens.c.id)
            if t.conn.execute(ins).first() is None:
                raise Conflict(f"agent {agent_id!r} already has a live token")
            return t.conn.execute(sa.select(tokens).where(tokens.c.id == token_id)).one()

        return _token_view(self.store._write(tx)), full

    def list_tokens(self) -> list[TokenView]:
        def q(conn: Connection) -> list[TokenView]:
            rows = conn.execute(sa.select(tokens).order_by(tokens.c.created_at, tokens.c.id))
            return [_token_view(r) for r in rows]

        return self.store._read(q)

    def revoke_token(self, token_id: str) -> TokenView:
        """Revoke a token at once (idempotent: a revoked token stays revoked as it was)."""

        def tx(t: _Tx) -> Any:
            t.conn.execute(
                sa.update(tokens)
                .where(tokens.c.id == token_id, tokens.c.revoked_at.is_(None))
                .values(revoked_at=t.now)
            )
            row = t.conn.execute(sa.select(tokens).where(tokens.c.id == token_id)).first()
            if row is None:
                raise NotFound(f"no token {token_id!r}")
            return row

        return _token_view(self.store._write(tx))

    def verify(self, token: str) -> Principal:
        """Who ``token`` acts as; AuthFailure (401) saying why it does not."""
        token_id, secret = parse_token(token)

        def q(conn: Connection) -> tuple[Any, datetime]:
            row = conn.execute(
                sa.select(tokens, users.c.role, users.c.disabled)
                .select_from(tokens.outerjoin(users, users.c.name == tokens.c.user_name))
                .where(tokens.c.id == token_id)
            ).first()
            return row, self.store._now_fn(conn)

        row, now = self.store._read(q)
        # The same comparison whether or not the id exists: no timing hint.
        stored = row.secret_sha256 if row is not None else "0" * 64
        if not hmac.compare_digest(hash_secret(secret), stored) or row is None:
            raise AuthFailure("invalid token")
        if row.revoked_at is not None:
            raise AuthFailure("token revoked")
        if row.expires_at is not None and row.expires_at <= now:
            raise AuthFailure("token expired")
        if row.kind == "user":
            if row.role is None or row.disabled:
                raise AuthFailure("the token's user is removed or disabled")
            return Principal(
                "user", row.role, name=row.user_name, token_id=row.id, expires_at=row.expires_at
            )
        if row.kind == "agent":
            return Principal(
                "agent",
                Role.AGENT.value,
                agent_id=row.agent_id,
                token_id=row.id,
                expires_at=row.expires_at,
            )
        return Principal("join", Role.AGENT_JOIN.value, token_id=row.id, expires_at=row.expires_at)

    def bootstrap_admin(self, name: str = "admin") -> str | None:
        """On a database with no user: user ``name`` (admin) and a token of theirs.

        Returns the token, or None when users exist (another master, or an
        earlier start, made them). One transaction; on PostgreSQL two masters
        starting at once both find no user, only one inserts ``name``.
        """
        token_id, secret, full = new_token()

        def tx(t: _Tx) -> bool:
            if t.conn.execute(sa.select(users.c.name).limit(1)).first() is not None:
                return False
            ins = self.store._insert_ignore(users).values(
                name=name, role=Role.ADMIN.value, created_at=t.now, disabled=False
            )
            if t.conn.execute(ins.returning(users.c.name)).first() is None:
                return False
            t.conn.execute(
                sa.insert(tokens).values(
                    id=token_id,
                    kind="user",
                    user_name=name,
                    secret_sha256=hash_secret(secret),
                    created_at=t.now,
                    created_by="bootstrap",
                    description="bootstrap admin token (herder master, empty users table)",
                )
            )
            return True

        return full if self.store._write(tx) else None

    # ------------------------------------------- what authorization looks up

    def agent_exists(self, agent_id: str) -> bool:
        def q(conn: Connection) -> bool:
            return (
                conn.execute(sa.select(agents.c.id).where(agents.c.id == agent_id)).first()
                is not None
            )

        return self.store._read(q)

    def job_owner(self, job_id: int) -> str | None:
        """The owner of a job (immutable once submitted); NotFound for an unknown job."""

        def q(conn: Connection) -> str | None:
            row = conn.execute(sa.select(jobs.c.owner).where(jobs.c.id == job_id)).first()
            if row is None:
                raise NotFound(f"job {job_id} not found")
            return row.owner  # type: ignore[no-any-return]

        return self.store._read(q)

    def attempt_agent(self, attempt_id: int) -> str | None:
        """The agent an attempt was offered to (fixed at offer time); NotFound if unknown."""

        def q(conn: Connection) -> str | None:
            row = conn.execute(
                sa.select(attempts.c.agent_id).where(attempts.c.id == attempt_id)
            ).first()
            if row is None:
                raise NotFound(f"attempt {attempt_id} not found")
            return row.agent_id  # type: ignore[no-any-return]

        return self.store._read(q)

    def get_attempt(self, attempt_id: int) -> AttemptView:
        """``GET /api/v1/attempts/{id}``: the resource every attempt's ``href`` names."""

        def q(conn: Connection) -> AttemptView:
            row = conn.execute(sa.select(attempts).where(attempts.c.id == attempt_id)).first()
            if row is None:
                raise NotFound(f"attempt {attempt_id} not found")
            return views.attempt_view(row)

        return self.store._read(q)
