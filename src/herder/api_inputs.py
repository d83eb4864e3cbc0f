"""Wire model of a submission held for its inputs (``POST /jobs?inputs=later``, issue 10).

The ``result`` of the continuation a master answers when some of the job's
required blobs are not stored yet (docs/protocol-deferrals.md): the job was
created ``waiting`` and is released once the last of ``missing`` is uploaded.
Kept apart from ``herder.api_models`` (which is at its size budget).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from herder.api_base import _Out

_Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="sha256, lowercase hex")]


class JobHeld(_Out):
    """A job created (or found by its idempotency key) that waits for uploads."""

    id: int
    href: str
    created: bool = Field(description="false: the idempotency key named an existing job")
    state: str = Field(description="waiting while anything is missing")
    missing: list[_Digest] = Field(
        description="digests not stored yet: PUT /api/v1/blobs/{digest} each, to any "
        "read-write master"
    )
    task_ids: list[int] = Field(description="the job's task ids, in submission order")
