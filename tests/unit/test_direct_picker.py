"""Direct mode's host choice and backoff (herder.direct.HostPicker), with a fake clock."""

from __future__ import annotations

import random

import pytest

from herder.direct import HostPicker, Poll, parse_hosts


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def picker(hosts: list[str], clock: Clock, seed: int = 1, **kw: float) -> HostPicker:
    return HostPicker(hosts, clock=clock, rng=random.Random(seed), **kw)  # type: ignore[arg-type]


def test_cheapest_host_wins() -> None:
    p = picker(["a:1", "b:1", "c:1"], Clock())
    polls = {"a:1": Poll(1, 2, 0.5), "b:1": Poll(0, 2, 0.0), "c:1": Poll(1, 4, 0.25)}
    assert p.choose(polls) == "b:1"


def test_surcharge_counts_in_the_cost() -> None:
    p = picker(["a:1", "b:1"], Clock())
    assert p.choose({"a:1": Poll(0, 1, 0.5), "b:1": Poll(1, 4, 0.25)}) == "b:1"


def test_ties_are_broken_at_random() -> None:
    hosts = ["a:1", "b:1", "c:1"]
    chosen = set()
    for seed in range(40):
        p = picker(hosts, Clock(), seed=seed)
        chosen.add(p.choose({h: Poll(0, 1, 0.0) for h in hosts}))
    assert chosen == set(hosts)


def test_own_inflight_sends_count_until_released() -> None:
    """Two threads polling at once: the second does not take the host the first just took."""
    p = picker(["a:1", "b:1"], Clock())
    idle = {"a:1": Poll(0, 1, 0.0), "b:1": Poll(0, 1, 0.0)}
    first = p.choose(idle)
    second = p.choose(idle)  # the same stale answers
    assert {first, second} == {"a:1", "b:1"}
    assert p.choose(idle) is None  # both taken by this client
    assert first is not None
    p.release(first)
    assert p.choose(idle) == first


def test_all_busy_gives_none_and_backoff_grows_capped() -> None:
    p = picker(["a:1", "b:1"], Clock(), busy_base_s=0.1, busy_cap_s=0.8)
    assert p.choose({"a:1": Poll(1, 1, 1.0), "b:1": Poll(3, 2, 1.5)}) is None
    b = p.busy_backoff()
    delays = [b.next() for _ in range(8)]
    for n, d in enumerate(delays):
        full = min(0.8, 0.1 * 2**n)
        assert full / 2 <= d <= full, (n, d)  # binary exponential, jitter in the upper half
    assert max(delays) <= 0.8
    assert delays[3] > delays[0]


def test_threshold_is_configurable() -> None:
    p = picker(["a:1"], Clock(), busy_threshold=2.0)
    assert p.choose({"a:1": Poll(1, 1, 1.0)}) == "a:1"


def test_unreachable_host_skipped_then_retried_after_its_backoff() -> None:
    clock = Clock()
    p = picker(["a:1", "b:1"], clock, down_base_s=1.0, down_cap_s=4.0)
    d1 = p.mark_down("a:1", "connection refused")
    assert 0.5 <= d1 <= 1.0
    assert p.candidates() == ["b:1"]
    clock.t += d1
    assert p.candidates() == ["a:1", "b:1"]
    d2 = p.mark_down("a:1", "connection refused")  # still down: waits longer
    assert 1.0 <= d2 <= 2.0
    caps = [p.mark_down("a:1", "x") for _ in range(6)]
    assert max(caps) <= 4.0
    p.choose({"a:1": Poll(0, 1, 0.0)})  # it answered again: its backoff starts over
    assert 0.5 <= p.mark_down("a:1", "x") <= 1.0


def test_all_down_time_and_next_retry() -> None:
    clock = Clock()
    p = picker(["a:1", "b:1"], clock, down_base_s=1.0, down_cap_s=1.0)
    p.mark_down("a:1", "refused")
    assert p.all_down_for() == 0.0
    p.mark_down("b:1", "timed out")
    clock.t += 0.25
    assert p.all_down_for() == pytest.approx(0.25)
    assert p.next_retry_in() <= 0.75
    assert "a:1: refused" in p.errors() and "b:1: timed out" in p.errors()
    p.learn({"b:1": Poll(0, 1, 0.0)})
    assert p.all_down_for() == 0.0


def test_parse_hosts() -> None:
    assert parse_hosts("a:1, 127.0.0.2:7000,[::1]:9") == ["a:1", "127.0.0.2:7000", "[::1]:9"]
    with pytest.raises(ValueError, match="has no port"):
        parse_hosts("a")
    with pytest.raises(ValueError, match="no host"):
        parse_hosts(" , ")
