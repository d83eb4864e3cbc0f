"""The master's talkback cancel sender (herder.master.cancels) against a real talkback server.

The agent behind the endpoint is a small recorder (the endpoint's
``TalkbackAgent`` protocol); the HTTP is real, on loopback.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from herder.agent.talkback import TalkbackServer
from herder.localfarm import free_port
from herder.master.cancels import CancelConfig, CancelSender
from herder.store.stops import CancelledAttempt

TOKEN = "cancel-sender-token-0123456789"


class Recorder:
    agent_id: str | None = "a1"

    def __init__(self, running: list[int]) -> None:
        self.running = running
        self.cancelled: list[tuple[int, str]] = []
        self.lock = threading.Lock()

    def wake(self) -> str:
        return "busy"

    def cancel_attempt(self, attempt_id: int, reason: str) -> None:
        with self.lock:
            self.cancelled.append((attempt_id, reason))
            self.running.remove(attempt_id)

    def talkback_status(self) -> dict[str, Any]:
        with self.lock:
            return {"agent_id": self.agent_id, "running": list(self.running)}


def item(attempt_id: int, url: str | None, token: str | None = TOKEN) -> CancelledAttempt:
    return CancelledAttempt(
        agent_id="a1",
        attempt_id=attempt_id,
        job_id=1,
        task_id=attempt_id,
        reason="job failed: task 7 failed: exit status 3",
        talkback_url=url,
        talkback_token=token,
    )


async def _drain(sender: CancelSender) -> None:
    for _ in range(1000):
        await asyncio.sleep(0.01)
        if not sender._tasks:
            return
    raise AssertionError("cancels still in flight after 10s")


def test_sender_posts_cancels_and_counts_what_it_could_not_send() -> None:
    agent = Recorder(running=[1, 2])
    server = TalkbackServer(agent, "127.0.0.1:0", TOKEN)
    url = server.start()
    dead = f"http://127.0.0.1:{free_port()}"
    try:

        async def scenario() -> CancelSender:
            sender = CancelSender(CancelConfig(timeout_s=5.0))
            sender.submit([item(1, url)])  # not bound to a loop yet: left to heartbeats
            assert sender.skipped == 1
            sender.bind(asyncio.get_running_loop())
            # submit() is called from the thread that committed: here, a worker thread
            batch = [
                item(1, url),
                item(2, url),
                item(3, url),  # not running there: 404
                item(4, None),  # no endpoint
                item(5, dead),  # unreachable
                item(6, url, token="wrong-token-0123456789"),  # refused: 401
            ]
            await asyncio.to_thread(sender.submit, batch)
            await asyncio.sleep(0)  # the loop runs the scheduled start
            await _drain(sender)
            await sender.close()
            sender.submit([item(1, url)])  # closed: left to heartbeats
            return sender

        t0 = time.monotonic()
        sender = asyncio.run(scenario())
        assert time.monotonic() - t0 < 20  # bounded (a stuck POST would hang it)
    finally:
        server.stop()
    assert sorted(agent.cancelled) == [
        (1, "job failed: task 7 failed: exit status 3"),
        (2, "job failed: task 7 failed: exit status 3"),
    ]
    assert (sender.sent, sender.failed, sender.skipped) == (5, 3, 3)


def test_disabled_sender_sends_nothing() -> None:
    async def scenario() -> CancelSender:
        sender = CancelSender(CancelConfig(enabled=False))
        sender.bind(asyncio.get_running_loop())
        sender.submit([item(1, "http://127.0.0.1:9")])
        await asyncio.sleep(0.05)
        await sender.close()
        return sender

    sender = asyncio.run(scenario())
    assert (sender.sent, sender.skipped) == (0, 1)
