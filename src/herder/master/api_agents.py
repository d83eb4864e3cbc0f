"""Routes of the agent cycle (DESIGN §4, §10): register, claim, ack, log, complete, heartbeat.

The hot routes (claim, heartbeat, ack, log, complete) validate their bodies
straight from the bytes (``parse_body``) instead of through FastAPI's body
machinery; ``body_doc`` keeps them described in the OpenAPI document.
"""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.responses import Response

from herder.api_auth import AgentRegistered
from herder.api_models import (
    AckRequest,
    AgentList,
    AgentRegister,
    AgentView,
    ClaimRequest,
    ClaimResponse,
    Completion,
    CompletionResult,
    Heartbeat,
    HeartbeatResponse,
    LogAppend,
)
from herder.errors import InvalidRequest
from herder.master import auth
from herder.master.context import (
    ERRORS,
    ApiContext,
    IdPath,
    NamePath,
    body_doc,
    error_response,
    fast_route,
    json_response,
    parse_body,
)


def register(app: FastAPI, ctx: ApiContext) -> None:
    service = ctx.service
    store = service.store

    @app.post(
        "/api/v1/agents",
        response_model=AgentRegistered,
        status_code=201,
        responses=ERRORS,
        openapi_extra=body_doc(AgentRegister),
    )
    async def register_agent(request: Request) -> Response:
        """Register an agent (200 again under its id). With a join token the answer
        carries the new agent's own token; an agent token registers itself only."""
        body = await parse_body(request, AgentRegister)
        who, authz = auth.principal_of(request), request.app.state.authorizer
        body = await authz.register_checked(who, body)
        agent, created = await ctx.call(store.register_agent, body)
        token = await authz.agent_token(who, agent.id)
        return json_response(auth.registered(agent, token), 201 if created else 200)

    @app.get("/api/v1/agents", response_model=AgentList, responses=ERRORS)
    async def list_agents() -> Response:
        return json_response(AgentList(agents=await ctx.call(store.list_agents)))

    @app.get("/api/v1/agents/{agent_id}", response_model=AgentView, responses=ERRORS)
    async def get_agent(agent_id: NamePath) -> Response:
        return json_response(await ctx.call(store.get_agent, agent_id))

    @app.post(
        "/api/v1/agents/{agent_id}/claim",
        response_model=ClaimResponse,
        responses=ERRORS,
        openapi_extra=body_doc(ClaimRequest),
    )
    async def claim(agent_id: NamePath, request: Request) -> Response:
        """Completions + acks + claim in one transaction; long-polls up to ``wait_s``."""
        body = await parse_body(request, ClaimRequest)
        deadline = time.monotonic() + body.wait_s
        gen = service.work.generation
        outcome = await ctx.call(
            service.claim_once, agent_id, body.max_tasks, body.completions, body.acks
        )
        results = outcome.results
        offers = outcome.offers
        # Long-poll: nothing to offer yet, so wait for a wake-up without
        # holding a thread; only a wake-up triggers another claim.
        waiting = not offers and body.max_tasks > 0 and body.wait_s > 0
        if waiting:
            with service.parking(agent_id):
                while not offers and not ctx.state.stopping:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or await request.is_disconnected():
                        break
                    if not await service.work.wait_async(gen, remaining):
                        break
                    gen = service.work.generation
                    # An agent that gave up on this poll (it closed the connection)
                    # must not be offered anything here: the offer would wait for
                    # its ack deadline.
                    if await request.is_disconnected():
                        break
                    outcome = await ctx.call(service.claim_once, agent_id, body.max_tasks)
                    offers = outcome.offers
        return json_response(
            ClaimResponse.model_construct(
                offers=offers, completions=results, lease_s=store.lease_s, drain=outcome.drain
            )
        )

    @app.post(
        "/api/v1/agents/{agent_id}/heartbeat",
        response_model=HeartbeatResponse,
        responses=ERRORS,
        openapi_extra=body_doc(Heartbeat),
    )
    async def heartbeat(agent_id: NamePath, request: Request) -> Response:
        body = await parse_body(request, Heartbeat)
        return json_response(await ctx.call(service.heartbeat, agent_id, body))

    # The agent cycle's hot requests answer from plain Starlette routes (the
    # FastAPI ones above describe them in the OpenAPI document).
    fast_route(app, "/api/v1/agents/{agent_id}/claim", claim)
    fast_route(app, "/api/v1/agents/{agent_id}/heartbeat", heartbeat)

    @app.post("/api/v1/agents/{agent_id}/drain", response_model=AgentView, responses=ERRORS)
    async def drain_agent(agent_id: NamePath) -> Response:
        """No new offers for the agent; its heartbeats answer ``drain: true`` until undrained."""
        return json_response(await ctx.call(store.set_drain, agent_id, True))

    @app.post("/api/v1/agents/{agent_id}/undrain", response_model=AgentView, responses=ERRORS)
    async def undrain_agent(agent_id: NamePath) -> Response:
        view = await ctx.call(store.set_drain, agent_id, False)
        service.work_arrived()
        return json_response(view)

    # -------------------------------------------------------------- attempts

    @app.post(
        "/api/v1/attempts/{attempt_id}/ack",
        status_code=204,
        responses=ERRORS,
        openapi_extra=body_doc(AckRequest),
    )
    async def ack(attempt_id: IdPath, request: Request) -> Response:
        body = await parse_body(request, AckRequest)
        await ctx.call(service.ack, attempt_id, body.token)
        return Response(status_code=204)

    @app.post(
        "/api/v1/attempts/{attempt_id}/log",
        status_code=204,
        responses=ERRORS,
        openapi_extra=body_doc(LogAppend),
    )
    async def append_log(attempt_id: IdPath, request: Request) -> Response:
        body = await parse_body(request, LogAppend)
        await ctx.call(store.append_log, attempt_id, body.token, body.chunks)
        return Response(status_code=204)

    @app.post(
        "/api/v1/attempts/{attempt_id}/complete",
        response_model=CompletionResult,
        responses=ERRORS,
        openapi_extra=body_doc(Completion),
    )
    async def complete(attempt_id: IdPath, request: Request) -> Response:
        body = await parse_body(request, Completion)
        if body.attempt_id != attempt_id:
            raise InvalidRequest(
                f"attempt_id {body.attempt_id} in the body does not match {attempt_id} in the path"
            )
        result = await ctx.call(service.complete, body)
        if result.result == "stale":
            return error_response(
                409,
                "stale_attempt",
                f"attempt {attempt_id} is no longer current; discard its result",
                result.model_dump(mode="json"),
            )
        return json_response(result)
