"""Two-transaction submission beside read-only masters (issue 10): real PostgreSQL primary
and hot standby (``pg_basebackup -R``), one read-write and two read-only masters.

The continuation's alternates name the read-write master only (an upload
writes; a hot standby cannot), though the directory lists the read-only
ones; a client that knows the read-only masters first still lands the
submission (through no-service) and every upload on the read-write master,
and the job is released.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

import pg
import pgstandby
from herder.api_models import JobSubmit, RequiredFile, StageSpec, TaskSpec
from herder.client import HerderClient
from herder.store.inputs import RELEASE_REASON
from mastersproc import MasterProc
from waiting import wait_for

pytestmark = pytest.mark.postgres


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Farm:
    def __init__(self, rw: MasterProc, ro: list[MasterProc]) -> None:
        self.rw, self.ro = rw, ro

    def logs(self) -> str:
        return "\n".join(f"--- {m.name}\n{m.log()[-3000:]}" for m in (self.rw, *self.ro))


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    workdir = tmp_path_factory.mktemp("replicas")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HERDER_MASTER_HEARTBEAT_S", "0.5")
        try:
            with pg.own_cluster() as primary, pgstandby.hot_standby(primary) as standby:
                primary_url = pg.create_database(primary.dsn)
                standby_url = (
                    make_url(primary_url)
                    .set(port=standby.port)
                    .render_as_string(hide_password=False)
                )
                rw = MasterProc(primary_url, workdir, "rw").start()
                pgstandby.wait_replayed(primary, standby)
                ro = [
                    MasterProc(standby_url, workdir, f"ro{i}", "--read-only").start()
                    for i in (1, 2)
                ]
                f = Farm(rw, ro)
                want = {rw.url: "read-write", **{m.url: "read-only" for m in ro}}
                for m in (rw, *ro):
                    wait_for(
                        lambda m=m: _directory(m.url) == want, 20, f"{m.name} lists all", f.logs
                    )
                try:
                    yield f
                finally:
                    for m in (*ro, rw):
                        m.stop()
        except pg.PostgresUnavailable as exc:
            pytest.fail(str(exc), pytrace=False)


def _directory(url: str) -> dict[str, str]:
    r = httpx.get(f"{url}/api/v1/masters", timeout=5, trust_env=False)
    return {m["url"]: m["role"] for m in r.json()["masters"]} if r.status_code == 200 else {}


def job(*data: bytes, key: str | None = None) -> JobSubmit:
    requires = [RequiredFile(path=f"f{i}", digest=sha(d)) for i, d in enumerate(data)]
    return JobSubmit(
        name="replicas",
        idempotency_key=key,
        stages=[StageSpec(name="s", tasks=[TaskSpec(command="true", requires=requires)])],
    )


def test_the_continuation_names_read_write_masters_only(farm: Farm) -> None:
    body = job(b"only rw stores this\n").model_dump(mode="json")
    r = httpx.post(
        f"{farm.rw.url}/api/v1/jobs", params={"inputs": "later"}, json=body, trust_env=False
    )
    assert r.status_code == 202, r.text
    assert r.json()["alternates"] == [farm.rw.url]
    # A read-only master refuses the upload itself, naming the read-write master.
    put = httpx.put(
        f"{farm.ro[0].url}{r.json()['continuation']['path']}",
        content=b"only rw stores this\n",
        trust_env=False,
    )
    assert put.status_code == 421 and put.json()["alternates"] == [farm.rw.url]


def test_a_client_knowing_read_only_masters_first_lands_everything_on_the_writer(
    farm: Farm,
) -> None:
    data = [f"input {i}\n".encode() for i in range(3)]
    spec = job(*data, key="replicas-1")
    masters = [m.url for m in farm.ro] + [farm.rw.url]
    with HerderClient(masters) as client:
        view = client.submit_job(spec, inputs={sha(d): d for d in data})
        assert view.state == "queued", view
        events = client.job_events(view.id)
    assert [(e.kind, e.reason) for e in events if e.kind == "job.release"] == [
        ("job.release", RELEASE_REASON)
    ]
    for d in data:  # stored on the primary (read there: handoff=false)
        got = httpx.get(
            f"{farm.rw.url}/api/v1/blobs/{sha(d)}", params={"handoff": "false"}, trust_env=False
        )
        assert got.content == d


def test_resumed_submission_through_read_only_masters(farm: Farm, tmp_path: Path) -> None:
    a, b = b"resume a\n", b"resume b\n"
    spec = job(a, b, key="replicas-2")
    first = httpx.post(
        f"{farm.rw.url}/api/v1/jobs",
        params={"inputs": "later"},
        json=spec.model_dump(mode="json"),
        trust_env=False,
    )
    assert first.status_code == 202
    httpx.put(f"{farm.rw.url}/api/v1/blobs/{sha(a)}", content=a, trust_env=False)
    (tmp_path / "b").write_bytes(b)
    with HerderClient([farm.ro[1].url, farm.rw.url]) as client:
        ids = client.submit_job_ids(spec, inputs={sha(a): a, sha(b): tmp_path / "b"})
        assert ids.id == first.json()["result"]["id"] and not ids.created
        assert client.get_job(ids.id).state == "queued"
