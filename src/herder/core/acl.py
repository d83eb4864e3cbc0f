"""Pool ACLs and what an agent accepts (DESIGN §8, §11; seeds/002), as pure rules.

- **Pool ACL**: per pool, the owners allowed to submit to it. No ACL (no row)
  or an ACL that lists ``*`` lets everyone in, which is how a farm without
  ACLs behaves. An empty list closes the pool. A job without an owner is let
  in only by ``*``: an ACL names people, and nobody is no one of them.
- **At submission** a job the ACL of its pool forbids is refused (403
  ``forbidden``); **at dispatch** (the claim) a queued task whose job's owner
  the ACL no longer allows is rejected with :func:`reject_reason` and never
  offered, and its job fails (``herder.store.acl``).
- **Agent accepts**: an agent started with ``--accept-owners``/
  ``--accept-pools`` is offered only tasks of those owners and pools; an
  empty list means every one. ``herder.store.sql`` transcribes
  :func:`agent_accepts` into the claim's SQL.

The store evaluates these functions (and only these) in Python; unit tests
are in ``tests/unit/test_acl_rules.py``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from herder.errors import HerderError

WILDCARD = "*"
#: Longest owner or pool name (the jobs table's columns).
NAME_MAX = 200
#: Most owners one ACL or one agent's accept list may name.
LIST_MAX = 10_000
# C0, DEL and C1 control characters; a comma separates names on the command line.
_BAD = re.compile(r"[\x00-\x1f\x7f-\x9f,]")


class PoolForbidden(HerderError):
    """The pool's ACL does not let this owner submit (403)."""

    code = "forbidden"
    status = 403


def may_submit(allow: Sequence[str] | None, owner: str | None) -> bool:
    """Whether ``owner`` may submit to a pool whose ACL is ``allow`` (None: no ACL)."""
    if allow is None or WILDCARD in allow:
        return True
    return owner is not None and owner in allow


def shown_owner(owner: str | None) -> str:
    return "(none)" if owner is None else owner


def reject_reason(pool: str, owner: str | None) -> str:
    """Why the ACL refuses a job: ``pool render: owner bob not allowed``."""
    return f"pool {pool}: owner {shown_owner(owner)} not allowed"


def agent_accepts(
    accept_owners: Sequence[str] | None,
    accept_pools: Sequence[str] | None,
    owner: str | None,
    pool: str,
) -> bool:
    """Whether an agent with these accept lists takes a task of ``owner`` in ``pool``.

    The lists are as :func:`normalize_accept` leaves them: an empty (or
    absent) list accepts everyone; a job without an owner is accepted only by
    an agent that names no owners.
    """
    if accept_owners and (owner is None or owner not in accept_owners):
        return False
    return not accept_pools or pool in accept_pools


def name_problem(name: str, what: str = "name") -> str | None:
    """Why ``name`` cannot be an owner or pool name in an ACL or accept list, or None."""
    if not name:
        return f"{what} is empty"
    if len(name) > NAME_MAX:
        return f"{what} is longer than {NAME_MAX} characters: {name[:40]!r}…"
    if name != name.strip():
        return f"{what} has leading or trailing whitespace: {name!r}"
    bad = _BAD.search(name)
    if bad is not None:
        kind = "a comma" if bad.group() == "," else f"a control character {bad.group()!r}"
        return f"{what} contains {kind}: {name!r}"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return f"{what} is not valid Unicode: {name!r}"
    return None


def normalize_names(names: Iterable[str], what: str = "owner") -> list[str]:
    """Checked, de-duplicated and sorted names; ValueError names the first bad one."""
    out: set[str] = set()
    for name in names:
        problem = name_problem(name, what)
        if problem is not None:
            raise ValueError(problem)
        out.add(name)
    if len(out) > LIST_MAX:
        raise ValueError(f"{len(out)} {what}s, more than {LIST_MAX}")
    return sorted(out)


def normalize_accept(names: Iterable[str], what: str = "owner") -> list[str]:
    """An agent's accept list: checked names; one that holds ``*`` is empty (everyone)."""
    out = normalize_names(names, what)
    return [] if WILDCARD in out else out


def parse_names(text: str, what: str = "owner") -> list[str]:
    """A comma-separated list (``alice,bob``) as :func:`normalize_names` returns it."""
    return normalize_names((p.strip() for p in text.split(",") if p.strip()), what)


__all__ = [
    "LIST_MAX",
    "NAME_MAX",
    "WILDCARD",
    "PoolForbidden",
    "agent_accepts",
    "may_submit",
    "name_problem",
    "normalize_accept",
    "normalize_names",
    "parse_names",
    "reject_reason",
    "shown_owner",
]
