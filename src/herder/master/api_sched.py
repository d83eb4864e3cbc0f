"""Routes of the scheduler's knobs (DESIGN §8, seeds/001): agent limits, owners' shares."""

from __future__ import annotations

from typing import Annotated

from fastapi import FastAPI, Path
from fastapi.responses import Response

from herder.api_models import AgentLimits, AgentView, OwnerShareList, OwnerShareView, ShareUpdate
from herder.errors import InvalidRequest
from herder.master.context import ERRORS, ApiContext, NamePath, json_response
from herder.store.shares import OwnerShare

OwnerPath = Annotated[str, Path(max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$")]


def _share_view(share: OwnerShare) -> OwnerShareView:
    return OwnerShareView(owner=share.owner, weight=share.weight, used_slot_s=share.used_s)


def register(app: FastAPI, ctx: ApiContext) -> None:
    store = ctx.service.store

    @app.patch("/api/v1/agents/{agent_id}", response_model=AgentView, responses=ERRORS)
    async def update_agent(agent_id: NamePath, body: AgentLimits) -> Response:
        """Change an agent's own limits at run time (``max_ram_mb``, ``max_load``; null lifts
        one). Its next claim follows them; its own flags win when it registers again."""
        view = await ctx.call(store.set_agent_limits, agent_id, body)
        ctx.service.work_arrived()  # a raised limit may let it take queued work
        return json_response(view)

    @app.get("/api/v1/owners", response_model=OwnerShareList, responses=ERRORS)
    async def list_owners() -> Response:
        """Owners' fair-share weights and their slot-seconds over the share window."""
        shares = await ctx.call(store.owner_shares)
        return json_response(OwnerShareList(owners=[_share_view(s) for s in shares]))

    @app.put("/api/v1/owners/{owner}/share", response_model=OwnerShareView, responses=ERRORS)
    async def set_share(owner: OwnerPath, body: ShareUpdate) -> Response:
        """Set an owner's weight (default 1): with weights 2:1, two saturating owners split
        the farm's slot-seconds 2:1."""
        try:
            share = await ctx.call(store.set_owner_weight, owner, body.weight)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc
        return json_response(_share_view(share))
