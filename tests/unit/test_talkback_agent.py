"""The agent's talkback endpoint (herder.agent.talkback), the agent's wake slot
accounting against a fake master, and the master's wake rounds (herder.master.wake)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_agent_daemon import FakeMaster, Running, make_config

from herder.agent.daemon import Agent
from herder.agent.talkback import TalkbackServer, parse_bind
from herder.api_models import ClaimRequest, ClaimResponse
from herder.master.metrics import MasterStats
from herder.master.wake import WakeConfig, Waker
from herder.store.store import WakeTarget
from waiting import until_file

TOKEN = "t" * 32


class FakeAgent:
    agent_id = "agent-x"

    def __init__(self) -> None:
        self.woken = 0
        self.cancelled: list[tuple[int, str]] = []
        self.running = [7]

    def wake(self) -> str:
        self.woken += 1
        return "claiming"

    def cancel_attempt(self, attempt_id: int, reason: str) -> None:
        self.cancelled.append((attempt_id, reason))

    def talkback_status(self) -> dict[str, Any]:
        return {"agent_id": self.agent_id, "running": self.running, "slots": 2}


class ModalAgent(FakeAgent):
    mode = "autonomous"

    def request_master_mode(self) -> None:
        self.mode = "master"


@pytest.fixture
def serve() -> Iterator[Callable[[Any], tuple[str, httpx.Client]]]:
    servers: list[TalkbackServer] = []
    clients: list[httpx.Client] = []

    def _serve(agent: Any) -> tuple[str, httpx.Client]:
        tb = TalkbackServer(agent, "127.0.0.1:0", TOKEN)
        url = tb.start()
        servers.append(tb)
        c = httpx.Client(base_url=url, headers={"authorization": f"Bearer {TOKEN}"}, timeout=5)
        clients.append(c)
        return url, c

    yield _serve
    for c in clients:
        c.close()
    for s in servers:
        s.stop()


def test_parse_bind() -> None:
    assert parse_bind("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_bind("[::1]:7000") == ("::1", 7000)
    for bad in ("nohost", ":80", "h:x", "h:70000"):
        with pytest.raises(ValueError):
            parse_bind(bad)


def test_requests_need_the_token(serve: Callable[[Any], tuple[str, httpx.Client]]) -> None:
    agent = FakeAgent()
    url, _ = serve(agent)
    for headers in (
        {},
        {"authorization": "Bearer wrong-token-wrong-token"},
        {"authorization": TOKEN},
    ):
        for method, path in (("GET", "/talkback/status"), ("POST", "/talkback/wake")):
            r = httpx.request(method, url + path, headers=headers, json={}, timeout=5)
            assert r.status_code == 401, (headers, path)
            assert r.json()["error"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
    assert agent.woken == 0


def test_endpoints(serve: Callable[[Any], tuple[str, httpx.Client]]) -> None:
    agent = FakeAgent()
    _, c = serve(agent)
    r = c.get("/talkback/status")
    assert r.status_code == 200 and r.json()["agent_id"] == "agent-x"
    r = c.post("/talkback/wake")
    assert r.status_code == 202 and r.json()["wake"] == "claiming" and agent.woken == 1
    r = c.post("/talkback/cancel", json={"attempt_id": 7})
    assert r.status_code == 200 and agent.cancelled[0][0] == 7
    r = c.post("/talkback/cancel", json={"attempt_id": 8})
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    r = c.post("/talkback/cancel", json={"attempt_id": "7"})
    assert r.status_code == 422
    r = c.post("/talkback/cancel", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "malformed_json"
    r = c.post("/talkback/mode", json={"mode": "master"})
    assert r.status_code == 501 and "request_master_mode" in r.json()["message"]
    assert c.get("/talkback/wake").status_code == 405
    assert c.get("/talkback/nope").status_code == 404


def test_mode_calls_the_seam(serve: Callable[[Any], tuple[str, httpx.Client]]) -> None:
    agent = ModalAgent()
    _, c = serve(agent)
    r = c.post("/talkback/mode", json={"mode": "master"})
    assert r.status_code == 200 and r.json()["mode"] == "master"
    assert c.post("/talkback/mode", json={"mode": "autonomous"}).status_code == 422


# ------------------------------------------------------------ agent accounting


class DeafMaster(FakeMaster):
    """A master whose long-polls do not hear of new work (it was queued through another
    master) until the test releases them; immediate claims see the queue."""

    def __init__(self, slots: int) -> None:
        super().__init__(slots)
        self.release = threading.Event()
        self.parked = 0
        self.max_running = 0

    def claim(self, agent_id: str, req: ClaimRequest) -> ClaimResponse:
        if req.wait_s > 0 and req.max_tasks and not req.completions:
            with self.lock:
                self.parked += 1
                self.lock.notify_all()
            self.release.wait(req.wait_s)
            with self.lock:
                self.parked -= 1
        return super().claim(agent_id, req.model_copy(update={"wait_s": 0.0}))


def test_wake_claims_at_once_and_never_overruns_slots(tmp_path: Path) -> None:
    fake = DeafMaster(1)
    agent = Agent(make_config(tmp_path, slots=1, poll_wait_s=30.0, talkback=None), client=fake)
    run = Running(agent)
    gate = tmp_path / "gate"  # the first task holds the only slot until the test opens it
    try:
        fake.wait_for(lambda: fake.parked == 1)
        assert agent.wake() == "poller" or agent.talkback_status()["parked"]
        # that wake's own claim (of an empty queue) must be over before the next wake
        fake.wait_for(lambda: not any(t.name == "herder-wake" for t in threading.enumerate()))
        fake.add(until_file(gate))
        t0 = time.monotonic()
        assert agent.wake() == "claiming"
        fake.wait_for(lambda: len(fake.outstanding) == 1, timeout=5)
        assert time.monotonic() - t0 < 10  # did not wait for the parked poll (30 s)
        # Work the parked poll now finds while the only slot is taken goes straight back.
        fake.add("true")
        fake.release.set()
        fake.wait_for(lambda: any(c.outcome == "released" for c in fake.completions.values()))
        st = agent.talkback_status()
        assert st["busy"] + st["reserved"] <= 1
        gate.touch()
        fake.wait_for(lambda: any(c.outcome == "exited" for c in fake.completions.values()))
    finally:
        gate.touch()
        run.stop()
    outcomes = sorted(c.outcome for c in fake.completions.values())
    assert outcomes == ["exited", "released"]
    assert agent.reserved == 0 and agent.busy == 0


def test_wake_when_full_does_nothing(tmp_path: Path) -> None:
    fake = FakeMaster(1)
    agent = Agent(make_config(tmp_path, slots=1, talkback=None), client=fake)
    run = Running(agent)
    gate = tmp_path / "gate"
    try:
        fake.add(until_file(gate))
        # booked by the agent, not merely handed out by the master
        fake.wait_for(lambda: agent.busy == 1 and agent.reserved == 0)
        assert agent.wake() in ("busy", "delivering")
    finally:
        gate.touch()
        run.stop()
    assert fake.violations == []


# ---------------------------------------------------------------- master waker


def test_waker_counts_unreachable_agents_and_debounces() -> None:
    hits: list[str] = []

    async def main() -> MasterStats:
        stats = MasterStats()
        rounds = 0

        async def targets(limit: int, exclude: Any) -> list[WakeTarget]:
            nonlocal rounds
            rounds += 1
            assert "parked-here" in set(exclude)
            return [WakeTarget("dead", "http://127.0.0.1:9", "x" * 20)]

        async def has_work() -> bool:
            hits.append("probe")
            return True

        waker = Waker(
            WakeConfig(timeout_s=0.3, min_interval_s=1.0),
            stats,
            targets,
            has_work,
            lambda: ["parked-here"],
        )
        for _ in range(20):
            waker.poke()
        await asyncio.sleep(0.05)
        assert rounds == 1  # at once, for all of them
        for _ in range(20):
            waker.poke()
        await asyncio.sleep(0.05)
        assert rounds == 1  # debounced: at most one round per min_interval_s
        await asyncio.sleep(2.0)
        await waker.close()
        assert rounds == 2  # one trailing round for the coalesced pokes
        return stats

    stats = asyncio.run(main())
    assert stats.wakes_sent == 2 and stats.wake_failures == 2
