"""Fairness of busy deferrals (seeds/004: "If the primary server permuted its
redirect list with each request, it would help ensure a more fair scheduling").

Three read-write ``herder master`` processes on one PostgreSQL database, each
with one admission worker and no queue (busy as soon as it serves one
request). Every client knows only the first master, as seeds/004's clients
know only the default server. 1,000 reads through the real client loop must
spread within ±15 % across the three: the busy master's alternates (the
other two, permuted in each answer) carry the load over.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import pg
from herder.api_models import JobSubmit, StageSpec, TaskSpec
from herder.client import HerderClient
from mastersproc import MasterProc
from waiting import wait_for

REQUESTS = 1000
CLIENTS = 9
JOBS = 120  # each read lists them all: a read costs the master some milliseconds


@pytest.fixture
def three_masters(
    pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[list[MasterProc]]:
    monkeypatch.setenv("HERDER_MASTER_HEARTBEAT_S", "0.5")
    db_url = pg.create_database(pg_dsn)
    flags = ("--admission-workers", "1", "--admission-depth", "0")
    masters: list[MasterProc] = []
    try:
        for i in range(3):  # one after the other: the first migrates
            masters.append(MasterProc(db_url, tmp_path, f"m{i}", *flags).start())
        yield masters
    finally:
        for m in masters:
            m.stop()
        try:
            pg.drop_database(pg_dsn, db_url)
        except Exception:
            pass


@pytest.mark.postgres
def test_reads_through_masters_that_defer_spread_evenly(three_masters: list[MasterProc]) -> None:
    first = three_masters[0]
    urls = {m.url for m in three_masters}

    def listed() -> bool:
        r = httpx.get(f"{first.url}/api/v1/masters", timeout=5, trust_env=False)
        return r.status_code == 200 and {m["url"] for m in r.json()["masters"]} == urls

    wait_for(listed, 20, "every master in the directory", lambda: first.log())
    with HerderClient(masters=[first.url], timeout=30) as client:
        for i in range(JOBS):
            client.submit_job(
                JobSubmit(
                    name=f"fair-{i}",
                    stages=[StageSpec(name="s", tasks=[TaskSpec(command="true")])],
                )
            )

    served: Counter[str] = Counter()
    lock = threading.Lock()
    left = [REQUESTS]
    errors: list[BaseException] = []

    def worker() -> None:
        with HerderClient(masters=[first.url], timeout=60) as c:
            while True:
                with lock:
                    if left[0] == 0:
                        return
                    left[0] -= 1
                try:
                    jobs = c.list_jobs(limit=JOBS)
                except BaseException as exc:  # reported below
                    errors.append(exc)
                    return
                assert len(jobs) == JOBS
                with lock:
                    served[str(c.preferred)] += 1

    threads = [threading.Thread(target=worker) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors[:3]
    assert sum(served.values()) == REQUESTS
    assert set(served) == urls, served
    fair = REQUESTS / 3
    for url, n in served.items():
        assert abs(n - fair) <= 0.15 * fair, (url, dict(served))
