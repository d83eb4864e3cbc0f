"""The admission queue (herder.master.admission) and the alternates of deferrals
(herder.master.deferrals), without a server: FIFO order, depth, the write wait,
priority never deferred, cancellation, alternates that fit the request."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from herder.master.admission import (
    AdmissionConfig,
    AdmissionQueue,
    Busy,
    Ticket,
    ticket_for,
)
from herder.master.deferrals import DirectoryCache, Peer


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def t(priority: bool = False, write: bool = False) -> Ticket:
    return Ticket(priority=priority, write=write)


def test_waiters_are_served_in_arrival_order_priority_or_not() -> None:
    async def main() -> list[int]:
        q = AdmissionQueue(AdmissionConfig(workers=1, depth=100, write_wait_s=60))
        order: list[int] = []
        gate = asyncio.Event()

        async def hold() -> None:
            async with q.slot(t()):
                await gate.wait()

        async def one(i: int) -> None:
            async with q.slot(t(priority=i % 2 == 0, write=i % 3 == 0)):
                order.append(i)
                await asyncio.sleep(0)

        holder = asyncio.create_task(hold())
        await asyncio.sleep(0)
        tasks = []
        for i in range(10):
            tasks.append(asyncio.create_task(one(i)))
            await asyncio.sleep(0)  # arrive one after the other
        assert q.waiting == 10 and q.active == 1
        gate.set()
        await asyncio.gather(holder, *tasks)
        assert q.active == 0 and q.waiting == 0
        return order

    assert run(main()) == list(range(10))


def test_past_depth_only_requests_without_priority_are_deferred() -> None:
    async def main() -> None:
        q = AdmissionQueue(AdmissionConfig(workers=1, depth=1, write_wait_s=60))
        gate = asyncio.Event()
        served: list[str] = []

        async def req(name: str, ticket: Ticket) -> None:
            async with q.slot(ticket):
                served.append(name)
                if name == "slow":
                    await gate.wait()

        slow = asyncio.create_task(req("slow", t()))
        await asyncio.sleep(0)
        first = asyncio.create_task(req("queued", t()))
        await asyncio.sleep(0)
        assert q.full()
        with pytest.raises(Busy) as info:
            q.check(t())  # at the door
        assert info.value.requests == 2
        with pytest.raises(Busy):
            await req("deferred", t())
        prio = asyncio.create_task(req("priority", t(priority=True)))
        await asyncio.sleep(0)
        assert q.waiting == 2  # queued past the depth, not deferred
        q.check(t(priority=True))  # never raises for priority
        gate.set()
        await asyncio.gather(slow, first, prio)
        assert served == ["slow", "queued", "priority"]
        assert q.deferred == 2

    run(main())


def test_a_write_waiting_too_long_is_deferred_unless_priority() -> None:
    async def main() -> None:
        q = AdmissionQueue(AdmissionConfig(workers=1, depth=10, write_wait_s=0.05))
        gate = asyncio.Event()

        async def hold() -> None:
            async with q.slot(t()):
                await gate.wait()

        holder = asyncio.create_task(hold())
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(Busy) as info:
            async with q.slot(t(write=True)):
                pass
        assert loop.time() - start >= 0.045
        assert "write waited" in info.value.message
        assert q.waiting == 0  # it left the queue

        async def read_and_priority_write() -> list[str]:
            got: list[str] = []

            async def one(name: str, ticket: Ticket) -> None:
                async with q.slot(ticket):
                    got.append(name)

            a = asyncio.create_task(one("read", t()))
            b = asyncio.create_task(one("priority-write", t(priority=True, write=True)))
            await asyncio.sleep(0.15)  # well past write_wait_s
            assert got == []
            gate.set()
            await asyncio.gather(a, b)
            return got

        assert await read_and_priority_write() == ["read", "priority-write"]
        await holder

    run(main())


def test_an_admitted_request_is_never_deferred_later() -> None:
    async def main() -> None:
        q = AdmissionQueue(AdmissionConfig(workers=1, depth=0, write_wait_s=0))
        ticket = t(write=True)
        async with q.slot(ticket):
            pass
        assert ticket.admitted and not ticket.deferrable
        gate = asyncio.Event()

        async def hold() -> None:
            async with q.slot(t()):
                await gate.wait()

        holder = asyncio.create_task(hold())
        await asyncio.sleep(0)
        q.check(ticket)  # the same request's second call: no deferral

        async def second() -> None:
            async with q.slot(ticket):
                pass

        task = asyncio.create_task(second())
        await asyncio.sleep(0.02)
        assert not task.done()
        gate.set()
        await asyncio.gather(holder, task)

    run(main())


def test_a_cancelled_waiter_gives_its_place_and_slot_back() -> None:
    async def main() -> None:
        q = AdmissionQueue(AdmissionConfig(workers=1, depth=10, write_wait_s=60))
        gate = asyncio.Event()

        async def hold() -> None:
            async with q.slot(t()):
                await gate.wait()

        holder = asyncio.create_task(hold())
        await asyncio.sleep(0)

        async def wait_slot() -> None:
            async with q.slot(t()):
                await asyncio.sleep(10)

        waiter = asyncio.create_task(wait_slot())
        await asyncio.sleep(0)
        assert q.waiting == 1
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)
        assert q.waiting == 0
        gate.set()
        await holder
        assert q.active == 0
        async with q.slot(t()):  # the slot is free again
            assert q.active == 1

    run(main())


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError):
        AdmissionQueue(AdmissionConfig(workers=0))
    with pytest.raises(ValueError):
        AdmissionQueue(AdmissionConfig(depth=-1))


def _scope(method: str, path: str, headers: list[tuple[bytes, bytes]] | None = None) -> Any:
    return {"type": "http", "method": method, "path": path, "headers": headers or []}


def test_tickets_of_requests() -> None:
    assert ticket_for(_scope("GET", "/healthz")).bypass
    assert ticket_for(_scope("GET", "/metrics")).bypass
    assert not ticket_for(_scope("GET", "/api/v1/jobs")).bypass
    assert ticket_for(_scope("PUT", "/api/v1/masters/ro1:8700")).bypass
    assert not ticket_for(_scope("POST", "/api/v1/masters/ro1:8700/failures")).bypass
    read = ticket_for(_scope("GET", "/api/v1/jobs/1"))
    assert not read.write and not read.priority
    assert ticket_for(_scope("POST", "/api/v1/jobs")).write
    flagged = ticket_for(_scope("GET", "/api/v1/jobs", [(b"herder-priority", b"1")]))
    assert flagged.priority
    assert not ticket_for(_scope("GET", "/api/v1/jobs", [(b"herder-priority", b"0")])).priority
    hb = ticket_for(_scope("POST", "/api/v1/agents/a1/heartbeat"))
    assert hb.priority and hb.write  # leases (DESIGN §5): queued, never deferred


def test_alternates_fit_the_request_never_self_and_are_permuted() -> None:
    d = DirectoryCache("http://me:1/")
    d.update(
        [
            Peer("http://me:1", "read-write"),
            Peer("http://rw2:1", "read-write"),
            Peer("http://rw3:1", "read-write"),
            Peer("http://ro1:1", "read-only"),
            Peer("http://ro2:1", "read-only"),
        ]
    )
    seen: Counter[tuple[str, ...]] = Counter()
    for _ in range(200):
        alts = d.alternates(write=False)
        assert sorted(alts) == ["http://ro1:1", "http://ro2:1", "http://rw2:1", "http://rw3:1"]
        seen[tuple(alts)] += 1
        assert sorted(d.alternates(write=True)) == ["http://rw2:1", "http://rw3:1"]
        assert sorted(d.readers()) == ["http://ro1:1", "http://ro2:1"]
    # 24 orders of 4: a fresh permutation each answer, every order turns up.
    assert len(seen) == 24
    # The cached list itself is never reordered.
    assert d.urls() == ["http://rw2:1", "http://rw3:1", "http://ro1:1", "http://ro2:1"]


def test_directory_copy_keeps_masters_that_heartbeat() -> None:
    from types import SimpleNamespace as NS

    d = DirectoryCache("http://me:1")
    d.update_from_views(
        [
            NS(url="http://me:1/", role="read-write", state="up", down_reason=None),
            NS(url="http://up:1/", role="read-write", state="up", down_reason=None),
            # reported failed (e.g. busy) but heartbeating: still an alternate
            NS(
                url="http://rep:1",
                role="read-write",
                state="failed",
                down_reason="failure_reported",
            ),
            NS(
                url="http://gone:1",
                role="read-only",
                state="failed",
                down_reason="heartbeat_timeout",
            ),
            NS(url="http://stop:1", role="read-only", state="stopped", down_reason="stopped"),
        ]
    )
    assert d.urls() == ["http://up:1", "http://rep:1"]
    assert d.readers() == []
