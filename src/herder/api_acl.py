"""Wire models of pools and their ACLs (``/api/v1/pools``; issue 11, seeds/002).

The rules themselves are ``herder.core.acl``: no ACL, or one that lists
``*``, lets every owner submit; an empty list closes the pool.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import Field, field_validator

from herder.api_base import _In, _Out
from herder.core.acl import LIST_MAX, normalize_names


class PoolAclSet(_In):
    """``PUT /api/v1/pools/{pool}/acl``: the owners allowed to submit to the pool."""

    allow: list[str] = Field(
        max_length=LIST_MAX,
        description="owners allowed to submit; '*' lets everyone in, [] closes the pool",
    )

    @field_validator("allow")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        return normalize_names(v)


class PoolAclView(_Out):
    pool: str
    allow: list[str] = Field(description="the owners allowed; ['*'] when everyone is")
    everyone: bool = Field(description="every owner may submit (no ACL, or one with '*')")
    restricted: bool = Field(description="the pool has an ACL row (PUT), else the default")
    updated_at: datetime | None = None
    version: int = Field(
        default=0, description="the farm's ACL version (bumped by every ACL write)"
    )


class PoolView(_Out):
    name: str
    allow: list[str]
    everyone: bool
    restricted: bool
    live_jobs: int = Field(description="jobs of the pool not finished yet")
    jobs: int = Field(description="jobs of the pool in the database")


class PoolList(_Out):
    pools: list[PoolView]
    version: int = 0


__all__ = ["PoolAclSet", "PoolAclView", "PoolList", "PoolView"]
