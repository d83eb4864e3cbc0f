"""Long-polling claims hold no master thread: hundreds wait on one process."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import psutil

from herder.localfarm import LocalFarm

AGENTS = 300


async def _register(client: httpx.AsyncClient, i: int) -> str:
    r = await client.post(
        "/api/v1/agents",
        json={"agent_id": f"lp-{i}", "name": f"lp-{i}", "hostname": "loopback", "slots": 1},
    )
    assert r.status_code in (200, 201), r.text
    return str(r.json()["id"])


async def _claim(
    client: httpx.AsyncClient, agent_id: str
) -> tuple[str, list[dict[str, object]], float]:
    r = await client.post(
        f"/api/v1/agents/{agent_id}/claim", json={"max_tasks": 1, "wait_s": 8}, timeout=30
    )
    assert r.status_code == 200, r.text
    return agent_id, r.json()["offers"], time.monotonic()


def test_hundreds_of_long_polls_hold_no_threads_and_wake_on_submit(tmp_path: Path) -> None:
    with LocalFarm(workdir=tmp_path) as farm:
        farm.start_master()
        assert farm.master is not None
        master = psutil.Process(farm.master.pid)

        async def scenario() -> None:
            limits = httpx.Limits(max_connections=AGENTS + 10)
            async with httpx.AsyncClient(base_url=farm.url, limits=limits, timeout=30) as client:
                ids = [await _register(client, i) for i in range(AGENTS)]
                started = time.monotonic()
                polls = [asyncio.create_task(_claim(client, a)) for a in ids]
                await asyncio.sleep(2.0)  # every poll is now parked in the master
                assert not any(p.done() for p in polls)
                threads = master.num_threads()
                print(f"master threads with {AGENTS} parked long-polls: {threads}")
                assert threads < 50, f"{AGENTS} long-polls use {threads} master threads"

                submitted = time.monotonic()
                r = await client.post(
                    "/api/v1/jobs",
                    json={
                        "name": "wake",
                        "stages": [{"name": "s", "tasks": [{"command": "true"}] * 3}],
                    },
                )
                assert r.status_code == 201
                results = await asyncio.gather(*polls)
            # All polls were parked at once: a thread per poll (a pool of 40)
            # would serve 300 eight-second polls in batches, over a minute.
            # (Arrivals spread over a few seconds on a loaded 2-core machine.)
            spread = sorted(at - started for _, _, at in results)
            print(
                f"poll answers after: min {spread[0]:.1f}s median {spread[len(spread) // 2]:.1f}s max {spread[-1]:.1f}s"
            )
            assert spread[-1] < 30
            winners = [(a, offers, at) for a, offers, at in results if offers]
            # Exactly three offers went out, each task to one agent only.
            assert len(winners) == 3
            assert len({o["task_id"] for _, offers, _ in winners for o in offers}) == 3
            # The wake-up, not the 8 s poll timeout, delivered them: every winner
            # answered before the first loser gave up at its deadline. (300 polls
            # wake at once and queue a claim each on two loaded cores.)
            last_winner = max(at for _, _, at in winners)
            assert last_winner < min(at for _, offers, at in results if not offers)
            assert last_winner - submitted < 5.0

        asyncio.run(scenario())
