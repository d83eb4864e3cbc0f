"""The store's follow read and bulk blobs, on SQLite and PostgreSQL (DESIGN §10)."""

from __future__ import annotations

import base64
import hashlib

import pytest

from herder.api_models import AgentRegister, LogChunk, OutputFile, TaskSpec
from herder.errors import DigestMismatch, NotFound
from herder.master.service import MasterService
from storekit import fail, job, make_store, ok, tasks


def test_follow_page_reports_offers_then_results_with_logs_and_blobs(db_url: str) -> None:
    store = make_store(db_url)
    try:
        service = MasterService(store)
        sub = service.submit(job(tasks(3), name="f"))
        store.register_agent(
            AgentRegister(agent_id="a1", name="a1", hostname="h", slots=3, cpus=4, ram_mb=0)
        )
        page0 = store.follow_page(sub.id, 0)
        assert page0.state == "queued" and page0.started == [] and page0.results == []
        offers = store.claim("a1", 3).offers
        page1 = store.follow_page(sub.id, page0.next)
        assert sorted(page1.started) == sorted(sub.task_ids)
        assert page1.results == [] and page1.state == "running"
        data = b"\x00binary output\xff"
        digest = hashlib.sha256(data).hexdigest()
        done = [
            ok(
                offers[0],
                outputs=[OutputFile(path="out/x.bin", digest=digest, size=len(data), mode=0o755)],
                blobs={digest: base64.b64encode(data).decode()},
                log=[LogChunk(stream="stdout", data="hé\n"), LogChunk(stream="stderr", data="w")],
            ),
            fail(offers[1], 7),
        ]
        store.claim("a1", 0, done)
        page2 = store.follow_page(sub.id, page1.next)
        by_id = {r.task_id: r for r in page2.results}
        good, bad = by_id[offers[0].task_id], by_id[offers[1].task_id]
        assert good.state == "succeeded" and good.stdout == "hé\n" and good.stderr == "w"
        assert [(o.path, o.mode) for o in good.outputs] == [("out/x.bin", 0o755)]
        assert good.blobs == {digest: data}
        assert bad.state == "failed" and bad.exit_code == 7 and bad.stdout == ""
        # The failure failed the job and stopped its work: the third task (offered) was
        # cancelled with it, in the same page; its late success is stale and adds nothing.
        assert page2.state == "failed"
        assert by_id[offers[2].task_id].state == "cancelled"
        assert store.follow_page(sub.id, page2.next).results == []
        (late,) = store.claim("a1", 0, [ok(offers[2])]).results
        assert late.result == "stale"
        assert store.follow_page(sub.id, page2.next).results == []
        assert {r.task_id for r in store.task_results(sub.task_ids)} == set(sub.task_ids)
        with_events = store.follow_page(sub.id, 0, include_events=True)
        assert with_events.events is not None and with_events.events[0].kind == "job.submit"
        with pytest.raises(NotFound):
            store.follow_page(999_999)
    finally:
        store.close()


def test_put_blobs_checks_every_digest_before_storing_any(db_url: str) -> None:
    store = make_store(db_url)
    try:
        a, b = b"a" * 10, b"b" * 10
        da, db_ = hashlib.sha256(a).hexdigest(), hashlib.sha256(b).hexdigest()
        with pytest.raises(DigestMismatch):
            store.put_blobs({da: a, db_: a})
        assert sorted(store.missing_blobs([da, db_])) == sorted([da, db_])
        assert store.put_blobs({da: a, db_: b}) == 2
        assert store.put_blobs({da: a}) == 0
        assert store.get_blob(db_) == b
    finally:
        store.close()


def test_service_refuses_local_tasks_and_bad_inline_blobs(db_url: str) -> None:
    from herder.errors import InvalidRequest

    store = make_store(db_url)
    try:
        service = MasterService(store)
        with pytest.raises(InvalidRequest, match="placement"):
            service.submit(job([TaskSpec(command="true", placement="local")]))
        spec = job(tasks(1)).model_copy(update={"blobs": {"0" * 64: "AAAA"}})
        with pytest.raises(DigestMismatch):
            service.submit(spec)
        assert store.list_jobs() == []
    finally:
        store.close()
