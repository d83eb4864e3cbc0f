"""What goes over the wire to a master: URLs, paths, headers, bodies, error answers.

Pure helpers of the request loop (``herder.client.loop``): no state, no I/O.
"""

from __future__ import annotations

import json as _jsonlib
from collections.abc import Sequence
from typing import Any

import httpx
from pydantic import BaseModel

from herder.client.errors import ApiError, ConflictError, NotFoundError, StaleAttemptError

API_PREFIX = "/api/v1"
PRIORITY_HEADER = "Herder-Priority"
CONTINUATION_HEADER = "Herder-Continuation"


def normalize_master_url(url: str) -> str:
    """``host:port`` → ``http://host:port``; drops a trailing ``/`` and ``/api/v1``."""
    if not isinstance(url, str):
        raise ValueError(f"master URL must be a string, not {type(url).__name__}")
    url = url.strip()
    if not url:
        raise ValueError("master URL is empty")
    if "://" not in url:
        url = "http://" + url
    url = url.rstrip("/")
    if url.endswith(API_PREFIX):
        url = url[: -len(API_PREFIX)].rstrip("/")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:  # not a ValueError: callers expect one
        raise ValueError(f"master URL {url!r} is not a valid URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"master URL {url!r} is not an http(s) URL with a host")
    return url


def split_masters(masters: str | Sequence[str]) -> list[str]:
    items = masters.replace(",", " ").split() if isinstance(masters, str) else list(masters)
    out: list[str] = []
    for item in items:
        url = normalize_master_url(item)
        if url not in out:
            out.append(url)
    if not out:
        raise ValueError("no master URL given")
    return out


def api_path(path: str) -> str:
    if not path.startswith("/"):
        path = "/" + path
    if path == API_PREFIX or path.startswith(API_PREFIX + "/"):
        return path
    return API_PREFIX + path


def json_body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def alternates_of(body: Any) -> list[str]:
    if isinstance(body, dict):
        alts = body.get("alternates")
        if isinstance(alts, list):
            return [a for a in alts if isinstance(a, str)]
    return []


def retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def error_from_response(response: httpx.Response) -> ApiError:
    status = response.status_code
    body = json_body(response)
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        code: str = body["error"]
        message = body.get("message")
        message = message if isinstance(message, str) else code
        detail = body.get("detail")
    elif isinstance(body, dict) and "detail" in body:  # a bare framework error
        code = f"http_{status}"
        message = str(body["detail"])
        detail = body["detail"]
    else:
        code = f"http_{status}"
        text = response.text.strip() if response.content else ""
        message = f"{response.reason_phrase or 'HTTP error'}" + (f": {text[:500]}" if text else "")
        detail = None
    if status == 404:
        return NotFoundError(status, code, message, detail)
    if status == 409:
        if code == "stale_attempt":
            return StaleAttemptError(status, code, message, detail)
        return ConflictError(status, code, message, detail)
    return ApiError(status, code, message, detail)


def dump(model: BaseModel) -> bytes:
    return model.model_dump_json().encode()


def json_bytes(value: Any) -> bytes:
    """Serialize a plain JSON value (compact, UTF-8)."""
    return _jsonlib.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
