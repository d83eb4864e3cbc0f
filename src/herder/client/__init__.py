"""The one client library of the master API, used by the CLI, the Python API and the agent.
Use ``with HerderClient(["http://m1:6238", "http://m2:6238"]) as client:``
then ``client.submit_job(spec)``, ``client.get_job(job.id)``, and so on.

A client that should wait out master outages (as the CLI's commands do)
takes ``master_timeout=SECONDS`` or ``outage=OutagePolicy(...)``
(``herder.client.outage``); past it, :class:`MasterOutageTimeout`.

Names are imported on first use, so a process that only needs the client's
errors or file helpers (the embedded farm) does not import the HTTP stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from herder.client.core import (
        API_PREFIX,
        CONTINUATION_HEADER,
        PRIORITY_HEADER,
        HerderClient,
        MasterFailure,
        normalize_master_url,
    )
    from herder.client.errors import (
        ApiError,
        AttemptRecord,
        BlobDigestError,
        ConflictError,
        HerderClientError,
        MasterOutageTimeout,
        NoMasterAvailable,
        NotFoundError,
        RequestOutcomeUnknown,
        StaleAttemptError,
    )
    from herder.client.files import sha256_bytes, sha256_file
    from herder.client.outage import OutagePolicy

_WHERE = {
    "API_PREFIX": "core",
    "CONTINUATION_HEADER": "core",
    "PRIORITY_HEADER": "core",
    "HerderClient": "core",
    "MasterFailure": "core",
    "normalize_master_url": "core",
    "ApiError": "errors",
    "AttemptRecord": "errors",
    "BlobDigestError": "errors",
    "ConflictError": "errors",
    "HerderClientError": "errors",
    "MasterOutageTimeout": "errors",
    "OutagePolicy": "outage",
    "NoMasterAvailable": "errors",
    "NotFoundError": "errors",
    "RequestOutcomeUnknown": "errors",
    "StaleAttemptError": "errors",
    "sha256_bytes": "files",
    "sha256_file": "files",
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'herder.client' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"herder.client.{where}"), name)
    globals()[name] = value
    return value


__all__ = [
    "API_PREFIX",
    "ApiError",
    "AttemptRecord",
    "BlobDigestError",
    "CONTINUATION_HEADER",
    "ConflictError",
    "HerderClient",
    "HerderClientError",
    "MasterFailure",
    "MasterOutageTimeout",
    "NoMasterAvailable",
    "NotFoundError",
    "OutagePolicy",
    "PRIORITY_HEADER",
    "RequestOutcomeUnknown",
    "StaleAttemptError",
    "normalize_master_url",
    "sha256_bytes",
    "sha256_file",
]
