"""What the master's route modules share: the service, the stats, the config, helpers."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from herder.api_models import ErrorBody
from herder.core.rules import DEFAULT_MASTER_HEARTBEAT_S
from herder.errors import HerderError
from herder.master.metrics import MasterStats
from herder.master.service import MasterService
from herder.master.wake import WakeConfig

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody},
    404: {"model": ErrorBody},
    409: {"model": ErrorBody},
    422: {"model": ErrorBody},
}


def default_master_id() -> str:
    """A name for this master process (the maintenance lock's holder)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


@dataclass
class MasterConfig:
    reap_interval_s: float = 1.0
    # Maintenance (reaping) runs on one master at a time: the holder of the
    # "reaper" lock row, renewed every round, taken over by another master
    # once it has not been renewed for this long (database clock).
    maintenance_ttl_s: float = 10.0
    master_id: str = field(default_factory=default_master_id)
    # While claims or follows are parked, one cheap read this often looks for
    # claimable work that no local wake-up announced (queued through another
    # master) and wakes them; parked polls themselves cost nothing.
    recheck_interval_s: float = 1.0
    max_blob_bytes: int = 1 << 30
    # The master directory (GET /api/v1/masters): the URL agents use to reach
    # this master (`herder master --advertise-url`; serve() defaults it to
    # http://<listen host>:<port>), its role, and its heartbeat. The directory
    # stops listing it once its heartbeat is older than heartbeat_timeout_s
    # (default: 3 intervals), judged by the database clock.
    url: str | None = None
    role: Literal["read-write", "read-only"] = "read-write"
    heartbeat_interval_s: float = DEFAULT_MASTER_HEARTBEAT_S
    heartbeat_timeout_s: float | None = None
    # Talkback wake-ups (herder.master.wake): when work arrives, POST wake to
    # idle agents' talkback endpoints. Latency only; never needed for correctness.
    wake: WakeConfig = field(default_factory=WakeConfig)


@dataclass
class ApiContext:
    service: MasterService
    stats: MasterStats
    cfg: MasterConfig
    state: Any  # the app's state (stopping flag)

    @property
    def store(self) -> Any:
        return self.service.store

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await run_in_threadpool(fn, *args, **kwargs)


def json_response(model: BaseModel, status: int = 200) -> Response:
    # Serialize with pydantic directly: FastAPI's response_model round-trip
    # would validate the object a second time on the hot path.
    return Response(model.model_dump_json(), status_code=status, media_type="application/json")


def error_response(status: int, code: str, message: str, detail: object = None) -> JSONResponse:
    body: dict[str, Any] = {"error": code, "message": message}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status)


class BodyError(HerderError):
    """A request body that is not valid JSON (400) or not a valid model (422)."""

    def __init__(self, status: int, code: str, message: str, detail: object = None) -> None:
        super().__init__(message, detail=detail)
        self.status = status
        self.code = code


def validation_error(errors: Iterable[Any], loc_prefix: tuple[str, ...] = ()) -> BodyError:
    """Pydantic's (or FastAPI's) validation errors as the API's error: 400
    ``malformed_json`` for a body that is not JSON, else 422 ``invalid_request``
    naming the first bad field."""
    detail = [
        {
            "loc": [str(p) for p in (*loc_prefix, *e.get("loc", ()))],
            "message": str(e.get("msg", "")),
            "type": str(e.get("type", "")),
        }
        for e in errors
    ]
    if any(d["type"] == "json_invalid" for d in detail):
        return BodyError(400, "malformed_json", "the request body is not valid JSON", detail)
    first = detail[0] if detail else {"loc": [], "message": "invalid"}
    where = ".".join(p for p in first["loc"] if p != "body") or "request"
    return BodyError(422, "invalid_request", f"{where}: {first['message']}", detail)


async def parse_body(request: Request, model: type[M]) -> M:
    """Validate a JSON body straight from its bytes (the hot routes skip FastAPI's body
    machinery); errors have the same shape as FastAPI's validation errors."""
    raw = await request.body()
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        raise validation_error(errors, ("body",)) from None


def body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route that parses its body itself (see ``herder.master.app``)."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
            },
        }
    }
