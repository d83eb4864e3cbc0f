"""SQL of the ACL rules that runs inside the claim's offer statement (``herder.store.sql``).

Its own module so that ``herder.store.sql`` can import it without importing
the store's mixins (``herder.store.acl`` builds on them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def accepts_sql(is_pg: bool) -> str:
    """``herder.core.acl.agent_accepts``, transcribed, on the offer window's ``jobs`` row:
    the task's job is of an owner and a pool the claiming agent accepts.

    ``:any_owner``/``:any_pool``: the agent names none (everyone's), and the list is
    never looked at. A job without an owner fails ``IN`` (NULL), as the rule says.
    """
    if is_pg:
        owner = "jobs.owner = ANY(CAST(:accept_owners AS text[]))"
        pool = "jobs.pool = ANY(CAST(:accept_pools AS text[]))"
    else:
        owner = "jobs.owner IN (SELECT value FROM json_each(:accept_owners))"
        pool = "jobs.pool IN (SELECT value FROM json_each(:accept_pools))"
    return f"AND (:any_owner OR {owner}) AND (:any_pool OR {pool}) "


def accepts_params(owners: Sequence[str], pools: Sequence[str], list_param: Any) -> dict[str, Any]:
    """The parameters of :func:`accepts_sql`; ``list_param`` binds a list for the dialect."""
    return {
        "any_owner": not owners,
        "accept_owners": list_param(owners),
        "any_pool": not pools,
        "accept_pools": list_param(pools),
    }


__all__ = ["accepts_params", "accepts_sql"]
