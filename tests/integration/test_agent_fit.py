"""An agent never runs more RAM than it has at once, claim-ahead or not (issue 13).

Short tasks make the agent claim ahead (DESIGN §10): offers beyond its free
slots, which the master checks against the agent's capacity only. The agent
then starts an offer only when it fits beside what runs. Each task records
its own start and end on the host, so overlaps are judged by the tasks'
clocks, not by batched acks.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from aclfarm import farm, wait_job


def _peak_ram(spans: list[tuple[float, float, int]]) -> int:
    """The most RAM (sum of ram_mb) of tasks running at one instant."""
    points = sorted([(s, r) for s, _, r in spans] + [(e, -r) for _, e, r in spans])
    most = now = 0
    for _, step in points:
        now += step
        most = max(most, now)
    return most


def test_claimed_ahead_offers_wait_until_they_fit(db_url: str, tmp_path: Path) -> None:
    spans_file = tmp_path / "spans.jsonl"

    def task(ram_mb: int) -> dict[str, object]:
        # Short (well under the agent's 0.25 s "short task" mark), so the window stays open.
        record = f's=$(date +%s.%N); sleep 0.08; echo "$s $(date +%s.%N) {ram_mb}" >> {spans_file}'
        return {"command": record, "ram_mb": ram_mb}

    with farm(db_url, tmp_path) as f, httpx.Client(timeout=30) as client:
        f.agent("fit", "--slots", "2", "--max-ram-mb", "4000", "--claim-ahead", "8")
        agent_id = f.agent_id(client, "fit")
        warm = {
            "name": "warm",
            "stages": [{"name": "s", "tasks": [{"command": ["true"]} for _ in range(8)]}],
        }
        wait_job(client, f, client.post(f"{f.api}/jobs", json=warm).json()["id"])
        # Two small ones fill both slots; the big ones are claimed ahead beside them
        # (each fits the agent alone) and must wait on it until they fit.
        mixed = {
            "name": "mixed",
            "stages": [{"name": "s", "tasks": [task(500), task(500)] + [task(3000)] * 4}],
        }
        job_id = client.post(f"{f.api}/jobs", json=mixed).json()["id"]
        job = wait_job(client, f, job_id, 90)
        assert job["state"] == "succeeded", f.logs()
        offers = [
            e
            for e in client.get(f"{f.api}/jobs/{job_id}/events").json()["events"]
            if e["kind"] == "task.offer" and e["agent_id"] == agent_id
        ]
    assert len(offers) >= 6  # offers held back when the window shrank are offered again
    spans = [
        (float(a), float(b), int(r))
        for a, b, r in (line.split() for line in spans_file.read_text().splitlines())
    ]
    assert len(spans) == 6
    assert _peak_ram(spans) > 0
    assert _peak_ram(spans) <= 4000, spans  # 2 slots, but 3000 + 3000 MB > 4000 MB
