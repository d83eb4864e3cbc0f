"""herder.master.notify.Signal: wake-ups for threads and coroutines, none missed."""

from __future__ import annotations

import asyncio
import threading
import time

from herder.master.notify import Signal


def test_a_thread_waiter_wakes_on_notify_and_times_out_without() -> None:
    sig = Signal()
    gen = sig.generation
    assert not sig.wait(gen, 0.05)
    threading.Timer(0.05, sig.notify).start()
    t0 = time.monotonic()
    assert sig.wait(gen, 5)
    assert time.monotonic() - t0 < 2
    assert sig.waiters == 0


def test_a_notify_between_look_and_wait_is_not_missed() -> None:
    sig = Signal()
    gen = sig.generation
    sig.notify()  # lands after the caller looked, before it waits
    t0 = time.monotonic()
    assert sig.wait(gen, 5)
    assert time.monotonic() - t0 < 0.5


def test_coroutine_waiters_wake_from_another_thread() -> None:
    sig = Signal()

    async def main() -> list[bool]:
        gen = sig.generation
        waits = [asyncio.create_task(sig.wait_async(gen, 5)) for _ in range(50)]
        await asyncio.sleep(0.05)
        assert sig.waiters == 50
        threading.Thread(target=sig.notify).start()
        return await asyncio.gather(*waits)

    t0 = time.monotonic()
    assert asyncio.run(main()) == [True] * 50
    assert time.monotonic() - t0 < 2
    assert sig.waiters == 0


def test_coroutine_wait_times_out() -> None:
    sig = Signal()

    async def main() -> bool:
        return await sig.wait_async(sig.generation, 0.05)

    assert asyncio.run(main()) is False
    assert sig.waiters == 0
