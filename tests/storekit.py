"""Builders the store tests share (tests/integration/test_store_*.py): a
migrated store, job and task specs, and completions of an offer."""

from __future__ import annotations

from typing import Any

from herder.api_models import Completion, JobSubmit, Offer, StageSpec, TaskSpec
from herder.store import Store


def make_store(db_url: str, **kw: Any) -> Store:
    return Store.open(db_url, migrate=True, **kw)


def job(*stages: list[TaskSpec], **kw: Any) -> JobSubmit:
    return JobSubmit(
        name=kw.pop("name", "job"),
        stages=[StageSpec(name=f"s{i}", tasks=ts) for i, ts in enumerate(stages)],
        **kw,
    )


def tasks(n: int, **kw: Any) -> list[TaskSpec]:
    return [TaskSpec(command=f"echo {i}", **kw) for i in range(n)]


def ok(o: Offer, **kw: Any) -> Completion:
    return Completion(attempt_id=o.attempt_id, token=o.token, outcome="exited", exit_code=0, **kw)


def fail(o: Offer, code: int = 3) -> Completion:
    return Completion(attempt_id=o.attempt_id, token=o.token, outcome="exited", exit_code=code)
