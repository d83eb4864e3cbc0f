"""The pure ACL rules (herder.core.acl) and the wire models built on them (no database)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from herder.api_acl import PoolAclSet
from herder.api_models import AgentRegister
from herder.core.acl import (
    LIST_MAX,
    PoolForbidden,
    agent_accepts,
    may_submit,
    name_problem,
    normalize_accept,
    normalize_names,
    parse_names,
    reject_reason,
)
from herder.core.states import TASK_SOURCES, TASK_TERMINAL, TaskEvent, TaskState, next_task_state


@pytest.mark.parametrize(
    ("allow", "owner", "expected"),
    [
        (None, "bob", True),  # no ACL: everyone, as before ACLs
        (None, None, True),
        (["*"], "bob", True),
        (["*"], None, True),
        (["alice", "*"], "bob", True),
        (["alice"], "alice", True),
        (["alice"], "bob", False),
        (["alice"], None, False),  # a job without an owner is none of the listed ones
        ([], "alice", False),  # an empty ACL closes the pool
        ([], None, False),
        (["Alice"], "alice", False),  # names are exact
    ],
)
def test_may_submit(allow: list[str] | None, owner: str | None, expected: bool) -> None:
    assert may_submit(allow, owner) is expected


@pytest.mark.parametrize(
    ("owners", "pools", "owner", "pool", "expected"),
    [
        ([], [], "bob", "render", True),
        (None, None, None, "render", True),
        (["alice"], [], "alice", "any", True),
        (["alice"], [], "bob", "any", False),
        (["alice"], [], None, "any", False),
        ([], ["render"], "bob", "render", True),
        ([], ["render"], "bob", "sim", False),
        (["alice"], ["render"], "alice", "render", True),
        (["alice"], ["render"], "alice", "sim", False),
        (["alice"], ["render"], "bob", "render", False),
    ],
)
def test_agent_accepts(
    owners: list[str] | None, pools: list[str] | None, owner: str | None, pool: str, expected: bool
) -> None:
    assert agent_accepts(owners, pools, owner, pool) is expected


def test_reject_reason_names_pool_and_owner() -> None:
    assert reject_reason("render", "bob") == "pool render: owner bob not allowed"
    assert reject_reason("render", None) == "pool render: owner (none) not allowed"
    err = PoolForbidden("x")
    assert (err.status, err.code) == (403, "forbidden")


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "is empty"),
        ("a,b", "contains a comma"),
        (" a", "leading or trailing whitespace"),
        ("a\t", "leading or trailing whitespace"),
        ("a\x00b", "control character"),
        ("a\x85b", "control character"),  # C1 (NEL)
        ("a" * 201, "longer than 200"),
        ("\udc80", "not valid Unicode"),
    ],
)
def test_bad_names(name: str, problem: str) -> None:
    found = name_problem(name, "owner")
    assert found is not None and problem in found and found.startswith("owner ")


@pytest.mark.parametrize("name", ["alice", "*", "team/a", "Émile", "a b", "x" * 200])
def test_good_names(name: str) -> None:
    assert name_problem(name) is None


def test_normalize_and_parse() -> None:
    assert normalize_names(["bob", "alice", "bob"]) == ["alice", "bob"]
    assert parse_names(" bob, alice,,bob ,") == ["alice", "bob"]
    assert parse_names("") == []
    assert normalize_accept(["bob", "*"]) == []  # '*' in an accept list: everyone
    with pytest.raises(ValueError, match="owner contains a comma"):
        normalize_names(["a,b"])
    with pytest.raises(ValueError, match=f"more than {LIST_MAX}"):
        normalize_names(f"u{i}" for i in range(LIST_MAX + 1))


def test_wire_models_check_names() -> None:
    assert PoolAclSet(allow=["b", "a", "a"]).allow == ["a", "b"]
    with pytest.raises(ValidationError, match="owner contains a control character"):
        PoolAclSet(allow=["a\x01"])
    with pytest.raises(ValidationError):
        PoolAclSet.model_validate({"allow": ["a"], "deny": ["b"]})  # unknown fields refused
    reg = AgentRegister(
        name="n", hostname="h", slots=1, accept_owners=["bob", "alice"], accept_pools=["*"]
    )
    assert (reg.accept_owners, reg.accept_pools) == (["alice", "bob"], [])
    assert AgentRegister(name="n", hostname="h", slots=1).accept_owners == []
    with pytest.raises(ValidationError, match="name contains a comma"):
        AgentRegister(name="n", hostname="h", slots=1, accept_pools=["a,b"])


def test_rejected_is_a_terminal_state_reached_from_queued_only() -> None:
    assert TASK_SOURCES[TaskEvent.REJECT] == (TaskState.QUEUED,)
    assert next_task_state(TaskState.QUEUED, TaskEvent.REJECT) is TaskState.REJECTED
    assert TaskState.REJECTED in TASK_TERMINAL
    # Only a user's retry (checked against the ACL again) brings it back.
    assert next_task_state(TaskState.REJECTED, TaskEvent.RETRY) is TaskState.QUEUED
    assert TaskState.REJECTED not in TASK_SOURCES[TaskEvent.CANCEL]
