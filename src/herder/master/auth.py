"""Authentication and authorization of the master's API (issue 11, DESIGN §11).

Secure by default: every request needs ``Authorization: Bearer hdr_<id>_<secret>``
except the public routes (``/healthz``, ``/metrics``, the OpenAPI document and
its pages), unless the master runs with ``--insecure-no-auth``
(``MasterConfig.auth = False``), which it logs as a warning at start.

One app-level FastAPI dependency (:meth:`Authorizer.dependency`) runs before
every route: it verifies the token (401 ``unauthorized`` with
``WWW-Authenticate: Bearer`` when it is missing, malformed, unknown, tampered
with, expired or revoked), then applies the route's rule from :data:`RULES`,
keyed by ``(method, path template)`` (403 ``forbidden`` when the role does
not allow it). A route without a rule is admin-only, so a new route is never
open by accident; ``tests/integration/test_authz_matrix.py`` fails for it.
The principal is left in ``request.state.principal`` for the routes
(:func:`principal_of`): a submission's owner is the authenticated user.

Verified tokens are cached for :data:`CACHE_S` seconds (a claim or heartbeat
costs no token read); a revocation through this master clears the cache at
once, one through another master takes effect here within ``CACHE_S``.
"""

from __future__ import annotations

import logging
import time
from enum import StrEnum
from typing import Any

from fastapi import Depends, FastAPI, Path, Request
from fastapi.responses import JSONResponse, Response

from herder.api_auth import (
    AgentRegistered,
    TokenCreate,
    TokenCreated,
    TokenList,
    TokenView,
    UserCreate,
    UserList,
    UserView,
    WhoAmI,
)
from herder.api_limits import INT64_MAX
from herder.api_models import AgentRegister, AgentView, AttemptView, ErrorBody, JobSubmit
from herder.errors import Conflict, InvalidRequest
from herder.master.context import ERRORS, ApiContext, IdPath, error_response, json_response
from herder.store.auth import (
    INSECURE,
    USER_ROLES,
    AuthFailure,
    AuthStore,
    Forbidden,
    Principal,
)

log = logging.getLogger("herder.master")

CACHE_S = 2.0
_NO_TOKEN = "this master needs a token"
_CACHE_MAX = 10_000
API = "/api/v1"


class Rule(StrEnum):
    """Who may call a route (see :meth:`Authorizer._allow`)."""

    PUBLIC = "public"  # no token
    ANY = "any"  # any valid token: users, agents, join tokens
    READ = "read"  # users of any role (viewer, submitter, admin)
    SUBMIT = "submit"  # submitters and admins
    OWN_JOB = "own_job"  # the job's owner (a submitter), admins
    UPLOAD = "upload"  # submitters, admins, agents: blobs in
    READ_OR_AGENT = "read_or_agent"  # users of any role, agents: blobs out
    AGENT_SELF = "agent_self"  # the agent named in the path, admins
    AGENT_READ = "agent_read"  # users of any role, the agent named in the path
    ATTEMPT_AGENT = "attempt_agent"  # the agent the attempt was offered to, admins
    ATTEMPT_READ = "attempt_read"  # users of any role, the attempt's agent
    REGISTER = "register"  # join tokens (new agents), agents (themselves), admins
    AGENTS_ADMIN = "agents_admin"  # agents (they report failed masters), admins
    ADMIN = "admin"


#: The rule of every route, by (method, path template). Kept in one table so the
#: authorization matrix test can hold the API to it.
RULES: dict[tuple[str, str], Rule] = {
    ("GET", "/healthz"): Rule.PUBLIC,
    ("GET", "/metrics"): Rule.PUBLIC,
    ("GET", f"{API}/health"): Rule.ANY,
    ("GET", f"{API}/whoami"): Rule.ANY,
    # master directory: agents and clients find masters through it
    ("GET", f"{API}/masters"): Rule.ANY,
    ("GET", f"{API}/masters/{{master_id}}"): Rule.ANY,
    ("GET", f"{API}/masters/{{master_id}}/failures"): Rule.READ,
    ("POST", f"{API}/masters/{{master_id}}/failures"): Rule.AGENTS_ADMIN,
    # a read-only master lists itself through a read-write one (herder.master.readonly)
    ("PUT", f"{API}/masters/{{master_id}}"): Rule.ADMIN,
    # jobs
    ("POST", f"{API}/jobs"): Rule.SUBMIT,
    ("GET", f"{API}/jobs"): Rule.READ,
    ("GET", f"{API}/jobs/{{job_id}}"): Rule.READ,
    ("PATCH", f"{API}/jobs/{{job_id}}"): Rule.OWN_JOB,
    ("POST", f"{API}/jobs/{{job_id}}/cancel"): Rule.OWN_JOB,
    ("POST", f"{API}/jobs/{{job_id}}/pause"): Rule.OWN_JOB,
    ("POST", f"{API}/jobs/{{job_id}}/resume"): Rule.OWN_JOB,
    ("POST", f"{API}/jobs/{{job_id}}/retry"): Rule.OWN_JOB,
    ("GET", f"{API}/jobs/{{job_id}}/events"): Rule.READ,
    ("GET", f"{API}/jobs/{{job_id}}/follow"): Rule.READ,
    ("GET", f"{API}/events"): Rule.READ,
    ("GET", f"{API}/tasks/{{task_id}}"): Rule.READ,
    # blobs
    ("POST", f"{API}/blobs/missing"): Rule.UPLOAD,
    ("PUT", f"{API}/blobs/{{digest}}"): Rule.UPLOAD,
    ("GET", f"{API}/blobs/{{digest}}"): Rule.READ_OR_AGENT,
    # agents
    ("POST", f"{API}/agents"): Rule.REGISTER,
    ("GET", f"{API}/agents"): Rule.READ,
    ("GET", f"{API}/agents/{{agent_id}}"): Rule.AGENT_READ,
    ("POST", f"{API}/agents/{{agent_id}}/claim"): Rule.AGENT_SELF,
    ("POST", f"{API}/agents/{{agent_id}}/heartbeat"): Rule.AGENT_SELF,
    ("POST", f"{API}/agents/{{agent_id}}/drain"): Rule.ADMIN,
    ("POST", f"{API}/agents/{{agent_id}}/undrain"): Rule.ADMIN,
    ("PATCH", f"{API}/agents/{{agent_id}}"): Rule.ADMIN,  # its limits
    # fair share between owners, pool ACLs (herder.store.acl): read by users, set by admins
    ("GET", f"{API}/owners"): Rule.READ,
    ("PUT", f"{API}/owners/{{owner}}/share"): Rule.ADMIN,
    ("GET", f"{API}/pools"): Rule.READ,
    ("GET", f"{API}/pools/{{pool}}/acl"): Rule.READ,
    ("PUT", f"{API}/pools/{{pool}}/acl"): Rule.ADMIN,
    ("DELETE", f"{API}/pools/{{pool}}/acl"): Rule.ADMIN,
    # attempts
    ("GET", f"{API}/attempts/{{attempt_id}}"): Rule.ATTEMPT_READ,
    ("GET", f"{API}/attempts/{{attempt_id}}/log"): Rule.ATTEMPT_READ,
    ("POST", f"{API}/attempts/{{attempt_id}}/ack"): Rule.ATTEMPT_AGENT,
    ("POST", f"{API}/attempts/{{attempt_id}}/log"): Rule.ATTEMPT_AGENT,
    ("POST", f"{API}/attempts/{{attempt_id}}/complete"): Rule.ATTEMPT_AGENT,
    # users and tokens
    ("GET", f"{API}/users"): Rule.ADMIN,
    ("POST", f"{API}/users"): Rule.ADMIN,
    ("DELETE", f"{API}/users/{{name}}"): Rule.ADMIN,
    ("GET", f"{API}/tokens"): Rule.ADMIN,
    ("POST", f"{API}/tokens"): Rule.ADMIN,
    ("POST", f"{API}/tokens/{{token_id}}/revoke"): Rule.ADMIN,
}

AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "no valid token (missing, expired, revoked)"},
    403: {"model": ErrorBody, "description": "the token's role does not allow this"},
}


def route_key(method: str, path: str) -> tuple[str, str]:
    """The :data:`RULES` key of a route (``{x:path}`` converters dropped)."""
    return method.upper(), path.replace(":path}", "}")


def principal_of(request: Request) -> Principal:
    """Who the request acts as (INSECURE on a master that checks nothing)."""
    found = getattr(request.state, "principal", None)
    return found if isinstance(found, Principal) else INSECURE


def bind_owner(spec: JobSubmit, who: Principal) -> JobSubmit:
    """A job's owner is the authenticated user; only an admin may submit for another."""
    if who.kind != "user" or who.name is None:
        return spec
    if spec.owner is None or spec.owner == who.name:
        return spec if spec.owner == who.name else spec.model_copy(update={"owner": who.name})
    if not who.is_admin:
        raise Forbidden(f"owner {spec.owner!r}: user {who.name!r} cannot submit as another user")
    return spec


class Authorizer:
    """Verifies tokens and applies :data:`RULES` for one app."""

    def __init__(self, ctx: ApiContext, enabled: bool) -> None:
        self.ctx = ctx
        self.enabled = enabled
        self.auth = AuthStore(ctx.store)
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._unruled: set[tuple[str, str]] = set()

    def forget(self) -> None:
        """Drop cached verifications (after a revocation or a user's removal)."""
        self._cache.clear()

    async def authenticate(self, request: Request) -> Principal:
        header = request.headers.get("authorization")
        if not header:
            raise AuthFailure(f"{_NO_TOKEN}: Authorization: Bearer hdr_…")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthFailure("expected Authorization: Bearer <token>")
        now = time.monotonic()
        hit = self._cache.get(token)
        if hit is not None and hit[1] > now:
            who = hit[0]
            if who.expires_at is None or who.expires_at.timestamp() > time.time():
                return who
        who = await self.ctx.call(self.auth.verify, token)
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[token] = (who, now + CACHE_S)
        return who

    async def dependency(self, request: Request) -> None:
        """Run before every route: 401 without a valid token, 403 past the route's rule."""
        if not self.enabled:
            return
        route = request.scope.get("route")
        path = getattr(route, "path", None)
        key = route_key(request.method, path if isinstance(path, str) else request.url.path)
        rule = RULES.get(key)
        if rule is None:
            if key not in self._unruled:
                self._unruled.add(key)
                log.warning("event=route_without_auth_rule method=%s path=%s admin_only", *key)
            rule = Rule.ADMIN
        if rule is Rule.PUBLIC:
            return
        who = await self.authenticate(request)
        request.state.principal = who
        if not await self._allow(rule, who, request):
            raise Forbidden(f"{who.role} may not {key[0]} {key[1]}")

    async def _allow(self, rule: Rule, who: Principal, request: Request) -> bool:
        user = who.kind == "user"
        agent = who.kind == "agent"
        if who.is_admin or rule is Rule.ANY:
            return True
        if rule is Rule.READ:
            return user
        if rule is Rule.SUBMIT:
            return user and who.role == "submitter"
        if rule is Rule.OWN_JOB:
            if not (user and who.role == "submitter"):
                return False
            job_id = _int_param(request, "job_id")
            if job_id is None:  # not an id: let the route's validation answer 422
                return True
            return await self.ctx.call(self.auth.job_owner, job_id) == who.name
        if rule is Rule.UPLOAD:
            return agent or (user and who.role == "submitter")
        if rule is Rule.READ_OR_AGENT:
            return user or agent
        if rule in (Rule.AGENT_SELF, Rule.AGENT_READ):
            if rule is Rule.AGENT_READ and user:
                return True
            return agent and request.path_params.get("agent_id") == who.agent_id
        if rule in (Rule.ATTEMPT_AGENT, Rule.ATTEMPT_READ):
            if rule is Rule.ATTEMPT_READ and user:
                return True
            if not agent:
                return False
            attempt_id = _int_param(request, "attempt_id")
            if attempt_id is None:
                return True
            return await self.ctx.call(self.auth.attempt_agent, attempt_id) == who.agent_id
        if rule is Rule.REGISTER:
            return agent or who.kind == "join"  # the body is checked by register_checked
        if rule is Rule.AGENTS_ADMIN:
            return agent
        return False  # ADMIN, and anything new

    async def register_checked(self, who: Principal, body: AgentRegister) -> AgentRegister:
        """An agent token registers itself only; a join token only an id nobody holds."""
        if who.kind == "agent":
            if body.agent_id is not None and body.agent_id != who.agent_id:
                raise Forbidden(
                    f"agent {who.agent_id!r} cannot register as agent {body.agent_id!r}"
                )
            return body.model_copy(update={"agent_id": who.agent_id})
        if (
            who.kind == "join"
            and body.agent_id is not None
            and await self.ctx.call(self.auth.agent_exists, body.agent_id)
        ):
            raise Forbidden(
                f"agent {body.agent_id!r} is registered already: only its own token "
                "may register it again"
            )
        return body

    async def agent_token(self, who: Principal, agent_id: str) -> str | None:
        """The new agent's own token, for a registration with a join token."""
        if who.kind != "join":
            return None
        try:
            _, token = await self.ctx.call(
                self.auth.create_token,
                "agent",
                agent_id=agent_id,
                created_by=f"join:{who.token_id}",
                description="agent token (joined)",
            )
        except Conflict:
            raise Forbidden(
                f"agent {agent_id!r} holds a token already: only it may register again"
            ) from None
        log.info("event=agent_joined agent_id=%s join_token=%s", agent_id, who.token_id)
        return token


def _int_param(request: Request, name: str) -> int | None:
    """A row id from the path; None for what the route's own validation refuses (422)."""
    try:
        value = int(request.path_params.get(name, ""))
    except ValueError:
        return None
    return value if 0 <= value <= INT64_MAX else None


async def _auth_failure(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, AuthFailure)
    # RFC 6750 §3: no error code when no token was sent at all.
    challenge = 'Bearer realm="herder"'
    if not exc.message.startswith(_NO_TOKEN):
        challenge += ', error="invalid_token"'
    return error_response(401, exc.code, exc.message, headers={"WWW-Authenticate": challenge})


def install(app: FastAPI, ctx: ApiContext, enabled: bool) -> Authorizer:
    """Add the dependency to every route registered after this call, and the auth routes."""
    authz = Authorizer(ctx, enabled)
    app.state.authorizer = authz
    app.router.dependencies.append(Depends(authz.dependency))
    app.add_exception_handler(AuthFailure, _auth_failure)
    if not enabled:
        log.warning(
            "event=insecure_no_auth the master checks no token: anyone who reaches it "
            "may submit, cancel, register agents and run commands on them"
        )
    _routes(app, ctx, authz)
    return authz


def _routes(app: FastAPI, ctx: ApiContext, authz: Authorizer) -> None:
    auth = authz.auth
    errors = {**ERRORS, **AUTH_ERRORS}

    @app.get(f"{API}/whoami", response_model=WhoAmI, responses=errors)
    async def whoami(request: Request) -> Response:
        """Who the request's token acts as."""
        who = principal_of(request)
        return json_response(
            WhoAmI(
                kind=who.kind,
                role=who.role,
                user=who.name,
                agent_id=who.agent_id,
                token_id=who.token_id,
                expires_at=who.expires_at,
            )
        )

    @app.get(f"{API}/attempts/{{attempt_id}}", response_model=AttemptView, responses=errors)
    async def get_attempt(attempt_id: IdPath) -> Response:
        """One attempt of a task: the resource its ``href`` names."""
        return json_response(await ctx.call(auth.get_attempt, attempt_id))

    @app.get(f"{API}/users", response_model=UserList, responses=errors)
    async def list_users() -> Response:
        return json_response(UserList(users=await ctx.call(auth.list_users)))

    @app.post(f"{API}/users", response_model=UserView, status_code=201, responses=errors)
    async def add_user(body: UserCreate) -> Response:
        """Add a user (409 when the name is taken). Roles: admin, submitter, viewer."""
        assert body.role in USER_ROLES
        return json_response(await ctx.call(auth.add_user, body.name, body.role), 201)

    NamePathParam = Path(pattern=r"^[A-Za-z0-9_.@-]{1,100}$")

    @app.delete(f"{API}/users/{{name}}", status_code=204, responses=errors)
    async def remove_user(name: str = NamePathParam) -> Response:
        """Remove a user and revoke every token of theirs; their jobs stay."""
        await ctx.call(auth.remove_user, name)
        authz.forget()
        return Response(status_code=204)

    @app.get(f"{API}/tokens", response_model=TokenList, responses=errors)
    async def list_tokens() -> Response:
        """Every token, without secrets."""
        return json_response(TokenList(tokens=await ctx.call(auth.list_tokens)))

    @app.post(f"{API}/tokens", response_model=TokenCreated, status_code=201, responses=errors)
    async def create_token(body: TokenCreate, request: Request) -> Response:
        """Make a token for a user (``user``) or a join token (``join``); the answer's
        ``token`` is the secret, shown this once."""
        if body.join == (body.user is not None):
            raise InvalidRequest("give either user (a user's token) or join (a join token)")
        who = principal_of(request)
        view, token = await ctx.call(
            auth.create_token,
            "join" if body.join else "user",
            user=body.user,
            expires_s=body.expires_s,
            description=body.description,
            created_by=who.name or who.kind,
        )
        return json_response(TokenCreated(**view.model_dump(), token=token), 201)

    TokenIdPath = Path(pattern=r"^[0-9a-f]{12}$")

    @app.post(f"{API}/tokens/{{token_id}}/revoke", response_model=TokenView, responses=errors)
    async def revoke_token(token_id: str = TokenIdPath) -> Response:
        """Revoke a token now (idempotent); this master forgets it at once."""
        view = await ctx.call(auth.revoke_token, token_id)
        authz.forget()
        return json_response(view)


def registered(view: AgentView, token: str | None) -> AgentRegistered:
    return AgentRegistered(**view.model_dump(), token=token)


def document(schema: dict[str, Any]) -> None:
    """The OpenAPI document: a bearer scheme, and 401/403 on every non-public operation."""
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})["bearer"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "hdr_<id>_<secret> (herder token create)",
    }
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            if not isinstance(op, dict) or RULES.get(route_key(method, path)) is Rule.PUBLIC:
                continue
            op["security"] = [{"bearer": []}]
            responses = op.setdefault("responses", {})
            for status, body in (
                ("401", "no valid token (missing, malformed, expired or revoked)"),
                ("403", "the token's role does not allow this"),
            ):
                responses.setdefault(
                    status,
                    {
                        "description": body,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/ErrorBody"}
                            }
                        },
                    },
                )
