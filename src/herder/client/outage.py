"""Riding out master outages: wait for a master, say so, resume (DESIGN §6, §12).

A client built with an :class:`OutagePolicy` (the CLI's commands; the Python
API with ``HerderClient(..., master_timeout=300)``) does not give up when a
request finds no master: :meth:`herder.client.loop.RequestLoop._request` asks
its :class:`OutageWatch` how long to wait (capped binary exponential backoff
with full jitter, never past the deadline), waits, forgets the discovery's
cached DNS and directory answers, and sends the same request again to every
master it knows: its list, the DNS alias and the directory of its discovery,
and every master it has seen during this session (a master's directory
cannot be read once that master is down).

The watch is shared by the client's threads (the build's follower and
fetchers), so one outage is announced once, ``herder: lost the master at URL
(connection refused); waiting up to 5m0s for a master…``, and its end once,
``herder: master URL is back after 7.2s``; the deadline counts from the
outage's start for every thread. Past it the request raises
:class:`~herder.client.errors.MasterOutageTimeout`; the CLI exits with
:data:`EXIT_NO_MASTER` and never cancels anything on that path.

Only requests that are safe to send again are sent again: the loop resends a
request after a round where no master was reached (it never arrived) or one
whose answer was lost only if it is idempotent; a lost answer to a
non-idempotent request is still :class:`~herder.client.errors.RequestOutcomeUnknown`.
"""

from __future__ import annotations

import logging
import math
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from herder.client.backoff import Backoff
from herder.client.errors import (
    AttemptRecord,
    HerderClientError,
    MasterOutageTimeout,
    NoMasterAvailable,
)

log = logging.getLogger(__name__)

DEFAULT_MASTER_TIMEOUT_S = 300.0
MASTER_TIMEOUT_ENV = "HERDER_MASTER_TIMEOUT"
#: The exit status of a command that gave up waiting for a master (sysexits' EX_TEMPFAIL:
#: try again later); distinct from a failed build (1) and a usage error (2).
EXIT_NO_MASTER = 75
MAX_REMEMBERED = 64

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|h|m|s)")


# --------------------------------------------------------------- durations


def parse_duration(text: str) -> float:
    """``"90"``, ``"1.5"``, ``"90s"``, ``"5m"``, ``"1h30m"``, ``"250ms"`` → seconds (≥ 0).

    Raises ValueError with a message that says what is accepted.
    """
    s = text.strip().lower()
    if not s:
        raise ValueError("empty duration")
    try:
        value = float(s)
    except ValueError:
        pos = 0
        value = 0.0
        for m in _DURATION_RE.finditer(s):
            if m.start() != pos:
                break
            value += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if pos != len(s) or pos == 0:
            raise ValueError(
                f"{text!r} is not a duration: give seconds (90, 1.5) or a duration "
                "like 90s, 5m, 1h30m, 250ms"
            ) from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{text!r} is not a duration: it must be a finite number of seconds ≥ 0")
    return value


def format_duration(seconds: float) -> str:
    """Seconds as ``7.2s``, ``3s``, ``5m0s``, ``1h2m3s`` (one decimal under a minute)."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        text = f"{seconds:.1f}".removesuffix(".0")
        return f"{text}s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes}m{secs}s" if hours else f"{minutes}m{secs}s"


def resolve_master_timeout(
    option: str | None, environ: Mapping[str, str], default: float = DEFAULT_MASTER_TIMEOUT_S
) -> float:
    """The master timeout (seconds) from ``--master-timeout``, else ``$HERDER_MASTER_TIMEOUT``.

    A bad value raises ValueError naming where it came from.
    """
    if option is not None:
        source, value = "--master-timeout", option
    elif environ.get(MASTER_TIMEOUT_ENV, "").strip():
        source, value = MASTER_TIMEOUT_ENV, environ[MASTER_TIMEOUT_ENV]
    else:
        return default
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None


# ----------------------------------------------------------------- reasons


def _short_reason(a: AttemptRecord) -> str:
    msg = a.message.lower()
    if a.outcome in ("busy", "gateway"):
        return a.outcome
    if a.outcome == "no_service":
        return "no service"
    if a.outcome == "timeout" or "timed out" in msg or "timeout" in msg:
        return "timeout"
    if "refused" in msg:
        return "refused"
    if "reset" in msg:
        return "reset"
    if a.outcome == "broken":
        return "closed"
    return "unreachable"


_LONG = {
    "refused": "connection refused",
    "reset": "connection reset",
    "closed": "connection closed",
    "timeout": "timed out",
    "gateway": "gateway error",
}


def lost_reason(exc: NoMasterAvailable) -> tuple[str, str]:
    """``(url, reason)`` of the first master a failed round tried (the one in use)."""
    if not exc.attempts:
        return "(no master known)", "no master configured"
    first = exc.attempts[0]
    short = _short_reason(first)
    return first.server, _LONG.get(short, short)


def tried_summary(attempts: Iterable[AttemptRecord]) -> str:
    """``http://a refused, http://b timeout``: each master once, with its last outcome."""
    last: dict[str, str] = {}
    for a in attempts:
        last.pop(a.server, None)  # keep first-tried order, last outcome
        last[a.server] = _short_reason(a)
    return ", ".join(f"{url} {why}" for url, why in last.items()) or "no master configured"


def gave_up_message(
    exc: NoMasterAvailable, *, job_id: int | None = None, master: str | None = None
) -> str:
    """The line a command prints when it stops waiting for a master."""
    waited = getattr(exc, "waited", 0.0)
    head = (
        f"herder: no master answered for {format_duration(waited)}"
        if waited
        else "herder: no master answered"
    )
    text = f"{head} (tried: {tried_summary(exc.attempts)})"
    if job_id is not None:
        where = f" --master {master}" if master else ""
        text += (
            f"; job {job_id} goes on in the farm — follow it with 'herder status {job_id}{where}'"
        )
    return text


# ------------------------------------------------------------------ policy


@dataclass(frozen=True)
class OutagePolicy:
    """How a client waits for a master: the deadline, the backoff, who hears about it.

    ``timeout_s``: how long one outage may last before requests give up
    (0: at once, but still as :class:`MasterOutageTimeout`). ``announce``
    receives the human lines (the CLI prints them on stderr); structured
    ``event=master_lost`` / ``event=master_back`` log records are written
    either way. ``clock`` and ``sleep`` are for tests (``sleep`` default:
    a wait that :meth:`OutageWatch.close` interrupts).
    """

    timeout_s: float = DEFAULT_MASTER_TIMEOUT_S
    backoff_base_s: float = 0.2
    # Small: a client polls a restarting master cheaply, and notices its return soon.
    backoff_cap_s: float = 3.0
    announce: Callable[[str], None] | None = None
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] | None = None
    rng: random.Random | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.timeout_s) or self.timeout_s < 0:
            raise ValueError(f"master timeout must be a finite number ≥ 0, not {self.timeout_s!r}")


class ClientClosed(HerderClientError):
    """The client was closed while a request waited for a master."""


class OutageWatch:
    """One client's master outages, shared by its threads (see the module docstring)."""

    def __init__(self, policy: OutagePolicy) -> None:
        self.policy = policy
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._since: float | None = None  # clock() when the current outage began
        self._remembered: list[str] = []
        self.outages = 0  # outages seen so far (one per announcement)

    # ------------------------------------------------------------- masters

    def remember(self, urls: Iterable[str]) -> None:
        """Masters seen while they were listed (tried again during an outage)."""
        new = [u for u in urls if u not in self._remembered]
        if new:
            with self._lock:
                for u in new:
                    if u not in self._remembered:
                        self._remembered.append(u)
                del self._remembered[:-MAX_REMEMBERED]

    def remembered(self) -> list[str]:
        with self._lock:
            return list(self._remembered)

    # -------------------------------------------------------------- outage

    @property
    def in_outage(self) -> bool:
        return self._since is not None

    def backoff(self) -> Backoff:
        p = self.policy
        return Backoff(p.backoff_base_s, p.backoff_cap_s, rng=p.rng)

    def remaining(self) -> float:
        """Seconds left before the current outage's deadline (the whole timeout if none)."""
        since = self._since
        if since is None:
            return self.policy.timeout_s
        return since + self.policy.timeout_s - self.policy.clock()

    def next_wait(self, exc: NoMasterAvailable, backoff: Backoff) -> float:
        """A round found no master: how long to wait before the next (announces a new outage).

        Raises :class:`MasterOutageTimeout` once the outage has lasted the timeout.
        """
        p = self.policy
        now = p.clock()
        with self._lock:
            new = self._since is None
            if new:
                self._since = now
                self.outages += 1
            since = self._since
            assert since is not None
        if new and p.timeout_s > 0:
            url, reason = lost_reason(exc)
            log.info(
                "event=master_lost url=%s reason=%r wait_up_to_s=%.1f request=%r",
                url,
                reason,
                p.timeout_s,
                f"{exc.method} {exc.path}",
            )
            self._say(
                f"herder: lost the master at {url} ({reason}); "
                f"waiting up to {format_duration(p.timeout_s)} for a master…"
            )
        remaining = since + p.timeout_s - now
        if remaining <= 0:
            log.info(
                "event=master_wait_over waited_s=%.1f tried=%r",
                now - since,
                tried_summary(exc.attempts),
            )
            raise MasterOutageTimeout(
                exc.method,
                exc.path,
                exc.attempts,
                waited=p.timeout_s if p.timeout_s > 0 else 0.0,
                retry_after=exc.retry_after,
            ) from exc
        delay = max(backoff.next(), exc.retry_after or 0.0)
        return min(delay, remaining)

    def back(self, url: str | None) -> None:
        """A master answered: end the outage (announced once)."""
        if self._since is None:  # the common case: no lock on the hot path
            return
        with self._lock:
            since, self._since = self._since, None
        if since is None:
            return
        after = self.policy.clock() - since
        log.info("event=master_back url=%s after_s=%.1f", url, after)
        self._say(f"herder: master {url or '?'} is back after {format_duration(after)}")

    def wait(self, delay: float) -> None:
        """Sleep ``delay`` seconds; :class:`ClientClosed` when the client closes meanwhile."""
        if self.policy.sleep is not None:
            self.policy.sleep(delay)
        else:
            self._closed.wait(max(0.0, delay))
        if self._closed.is_set():
            raise ClientClosed("the client was closed while waiting for a master")

    def close(self) -> None:
        self._closed.set()

    def _say(self, line: str) -> None:
        if self.policy.announce is not None:
            try:
                self.policy.announce(line)
            except Exception:  # a broken stderr must not break the request
                log.debug("event=announce_failed line=%r", line)
