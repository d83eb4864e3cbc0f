"""Routes of the master directory, health and metrics (DESIGN §4, §6; seeds/000, seeds/001)."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import FastAPI, Query, Request
from fastapi.responses import PlainTextResponse, Response

from herder import __version__
from herder.api_models import (
    MasterFailureList,
    MasterFailureReport,
    MasterFailureView,
    MasterList,
    MasterView,
)
from herder.master.admission import prometheus as admission_metrics
from herder.master.context import (
    ERRORS,
    ApiContext,
    NamePath,
    body_doc,
    json_response,
    parse_body,
)

log = logging.getLogger("herder.master")


def register(app: FastAPI, ctx: ApiContext) -> None:
    store = ctx.service.store
    stats = ctx.stats

    @app.get("/api/v1/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "version": __version__, "dialect": store.dialect}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        text = stats.prometheus()
        text += (
            "# HELP herder_parked_claims Agents' claims long-polling here for work.\n"
            "# TYPE herder_parked_claims gauge\n"
            f"herder_parked_claims {ctx.service.parked_claims()}\n"
        )
        queue = getattr(ctx.state, "admission", None)
        if queue is not None:  # the admission queue (herder.master.admission)
            text += admission_metrics(queue)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    # -------------------------------------------------------------- masters
    # Routes with a trailing segment come first: {master_id:path} takes a
    # directory id, a URL (percent-encoded or not) or the host:port of one.

    @app.post(
        "/api/v1/masters/{master_id:path}/failures",
        response_model=MasterFailureView,
        status_code=201,
        responses=ERRORS,
        openapi_extra=body_doc(MasterFailureReport),
    )
    async def report_master_failure(master_id: NamePath, request: Request) -> Response:
        """Record an agent's or client's failure to reach a master (DESIGN §6).

        ``master_id`` is its directory id, its URL, or the ``host:port`` of its
        URL. The directory hides the master until its next heartbeat. 404
        ``not_found`` ("no master … in the directory") for an unknown master.
        """
        body = await parse_body(request, MasterFailureReport)
        view = await ctx.call(store.report_master_failure, master_id, body)
        log.info(
            "event=master_failure_reported master=%s kind=%s reporter=%s request=%r",
            view.master_id,
            view.kind,
            view.reporter,
            view.request,
        )
        return json_response(view, 201)

    @app.get(
        "/api/v1/masters/{master_id:path}/failures",
        response_model=MasterFailureList,
        responses=ERRORS,
    )
    async def list_master_failures(
        master_id: NamePath, limit: Annotated[int, Query(ge=1, le=10_000)] = 100
    ) -> Response:
        """Failures reported for a master, newest first."""
        failures = await ctx.call(store.list_master_failures, master_id, limit)
        return json_response(MasterFailureList(failures=failures))

    @app.get("/api/v1/masters", response_model=MasterList, responses=ERRORS)
    async def list_masters(
        include_all: Annotated[
            bool,
            Query(alias="all", description="every master, with its state and failures"),
        ] = False,
    ) -> Response:
        """The master directory: masters that are up (heartbeat fresh, no failure since)."""
        return json_response(MasterList(masters=await ctx.call(store.list_masters, include_all)))

    @app.get("/api/v1/masters/{master_id:path}", response_model=MasterView, responses=ERRORS)
    async def get_master(master_id: NamePath) -> Response:
        """One master, whatever its state, by directory id, URL or ``host:port``."""
        return json_response(await ctx.call(store.get_master, master_id))
