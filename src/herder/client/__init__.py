"""The one client library of the master API, used by the CLI, the Python API and the agent.
Use ``with HerderClient(["http://m1:6238", "http://m2:6238"]) as client:``
then ``client.submit_job(spec)``, ``client.get_job(job.id)``, and so on.
"""

from __future__ import annotations

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
    NoMasterAvailable,
    NotFoundError,
    RequestOutcomeUnknown,
    StaleAttemptError,
)
from herder.client.files import sha256_bytes, sha256_file

__all__ = [
    "API_PREFIX",
    "CONTINUATION_HEADER",
    "PRIORITY_HEADER",
    "ApiError",
    "AttemptRecord",
    "BlobDigestError",
    "ConflictError",
    "HerderClient",
    "HerderClientError",
    "MasterFailure",
    "NoMasterAvailable",
    "NotFoundError",
    "RequestOutcomeUnknown",
    "StaleAttemptError",
    "normalize_master_url",
    "sha256_bytes",
    "sha256_file",
]
