"""Routes of pools and their ACLs (issue 11, DESIGN §11, seeds/002).

``GET /api/v1/pools`` lists the pools; ``GET|PUT|DELETE
/api/v1/pools/{pool}/acl`` show, set and clear who may submit to one. The
rules are ``herder.core.acl``; the store (``herder.store.acl``) checks every
submission against them and, after an ACL write, rejects the queued tasks of
jobs it now forbids at the next claim. A pool name may hold any character but
a control character (``{pool:path}``: a ``/`` too, percent-encoded or not).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import FastAPI, Path, Request
from fastapi.responses import Response

from herder.api_acl import PoolAclSet, PoolAclView, PoolList
from herder.core.acl import NAME_MAX
from herder.errors import InvalidRequest
from herder.master.context import ERRORS, ApiContext, body_doc, json_response, parse_body

#: A pool name in a path: what a submission's ``pool`` may be (1 to 200 characters).
PoolPath = Annotated[
    str,
    Path(
        min_length=1,
        max_length=NAME_MAX,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="the pool's name (percent-encoded)",
    ),
]


def _check_pool(pool: str) -> str:
    # The path pattern cannot say "no C1 control, valid Unicode": the rule can.
    from herder.core.acl import name_problem

    problem = name_problem(pool, "pool")
    if problem is not None and "comma" not in problem:  # a pool name may hold a comma
        raise InvalidRequest(problem, detail={"pool": pool})
    return pool


def register(app: FastAPI, ctx: ApiContext) -> None:
    store = ctx.service.store

    @app.get("/api/v1/pools", response_model=PoolList, responses=ERRORS)
    async def list_pools() -> Response:
        """Every pool that has jobs or an ACL, with who may submit to it."""
        pools, version = await ctx.call(store.list_pools)
        return json_response(PoolList(pools=pools, version=version))

    @app.get("/api/v1/pools/{pool:path}/acl", response_model=PoolAclView, responses=ERRORS)
    async def get_pool_acl(pool: PoolPath) -> Response:
        """Who may submit to the pool: ``everyone`` when it has no ACL (or one with ``*``)."""
        return json_response(await ctx.call(store.get_pool_acl, _check_pool(pool)))

    @app.put(
        "/api/v1/pools/{pool:path}/acl",
        response_model=PoolAclView,
        responses=ERRORS,
        openapi_extra=body_doc(PoolAclSet),
    )
    async def set_pool_acl(pool: PoolPath, request: Request) -> Response:
        """Let only the ``allow`` owners submit to the pool (``*``: everyone, ``[]``: nobody).

        Unfinished jobs of other owners in the pool are rejected at the next
        claim: their queued tasks become ``rejected`` with the reason (event
        ``task.reject``) and the job fails. 422 ``invalid_request`` for a bad name.
        """
        body = await parse_body(request, PoolAclSet)
        return json_response(await ctx.call(store.set_pool_acl, _check_pool(pool), body.allow))

    @app.delete("/api/v1/pools/{pool:path}/acl", response_model=PoolAclView, responses=ERRORS)
    async def clear_pool_acl(pool: PoolPath) -> Response:
        """Remove the pool's ACL: everyone may submit again (200 also when it had none)."""
        return json_response(await ctx.call(store.clear_pool_acl, _check_pool(pool)))
