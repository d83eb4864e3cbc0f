"""`herder run --direct`: remote actions straight to agents, no master (DESIGN §9, seeds/003).

Before each remote action the client asks every host its cost (in
parallel, short timeout) and sends the action to the cheapest, ties broken
at random (:class:`HostPicker`, pure logic with an injectable clock). The
cost a host answers counts what it is handling now over its slots; the
client takes the larger of that and what it has itself sent there and not
yet heard back from, so two of its own threads polling at the same moment
do not both pick the same idle host.

- Every host at or over ``busy_threshold`` (1.0: every slot taken): the
  action waits, binary exponential backoff with jitter, capped (seeds/003's
  "wait twice as long as last time"), then polls again.
- A host that cannot be reached is marked down with its own backoff and
  polled again once that has passed; an action sent to a host that then died
  is sent again elsewhere (a direct command is idempotent: its sandbox is
  thrown away, and only the client writes outputs, after success).
- No host reachable for ``give_up_s`` in a row: the build stops with an error
  naming every host and what went wrong with it.
- A host that refuses this client (its allow-list or token): the build stops
  at once with ``HOST refused this client: …``; so does a host whose TLS
  certificate does not verify (``TLS: certificate verify failed for …``).

TLS: a host given as ``https://HOST:PORT`` (or every host without a scheme,
the Rakefile's ``HOSTS`` included, when ``$HERDER_DIRECT_TLS`` is 1) is
reached over HTTPS and verified against ``--ca`` / ``$HERDER_CA``, else the
system trust store (``herder.tlsconf``).

The actions of one actionset run on a pool of threads sized to the total
slots of the hosts; local actions run here, as in farm mode, and progress
goes through the same reporter.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from herder.agent.config import Backoff
from herder.build import ActionRun, Build, BuildError, LocalAction, Reporter, SetRun, _exit_text
from herder.rakefile import Rakefile

log = logging.getLogger("herder.direct")

__all__ = ["DirectBuild", "HostPicker", "HostRefused", "Poll", "parse_hosts"]

TOKEN_ENV = "HERDER_DIRECT_TOKEN"
GIVE_UP_ENV = "HERDER_DIRECT_GIVE_UP_S"
TLS_ENV = "HERDER_DIRECT_TLS"  # 1: hosts without a scheme are reached over https


class HostRefused(BuildError):
    """A host answered 401/403: this client may not use it."""


class HostDown(Exception):
    """A host could not be reached, or went away during a request."""


def parse_hosts(value: str) -> list[str]:
    """``a:p,https://b:p`` → ``["a:p", "https://b:p"]`` (each needs a port); ValueError otherwise.

    A scheme (``http://`` or ``https://``) is kept: it overrides ``$HERDER_DIRECT_TLS``.
    """
    from herder.hostspec import parse_host

    hosts = []
    for word in value.split(","):
        word = word.strip()
        if not word:
            continue
        scheme, sep, rest = word.partition("://")
        if not sep:
            scheme, rest = "", word
        elif scheme.lower() not in ("http", "https"):
            raise ValueError(f"--hosts: {word!r}: the scheme must be http:// or https://")
        try:
            name, port = parse_host(rest, None)
        except ValueError as exc:
            raise ValueError(f"--hosts: {word!r}: {exc.args[0]}") from None
        if port is None:
            raise ValueError(f"--hosts: {word!r} has no port (expected HOST:PORT)")
        address = f"[{name}]:{port}" if ":" in name else f"{name}:{port}"
        hosts.append(f"{scheme.lower()}://{address}" if scheme else address)
    if not hosts:
        raise ValueError("--hosts: no host given")
    return hosts


@dataclass(frozen=True)
class Poll:
    """One host's answer to ``GET /direct/cost``."""

    running: int
    slots: int
    cost: float

    @property
    def surcharge(self) -> float:
        return self.cost - self.running / max(self.slots, 1)


@dataclass
class _HostState:
    name: str
    backoff: Backoff
    down_until: float = 0.0
    slots: int | None = None
    inflight: int = 0  # sent by this client, no answer yet
    error: str = ""


@dataclass
class HostPicker:
    """Which host gets the next action (pure logic; ``clock`` is injectable for tests)."""

    hosts: list[str]
    busy_threshold: float = 1.0
    busy_base_s: float = 0.02
    busy_cap_s: float = 0.5
    down_base_s: float = 0.25
    down_cap_s: float = 5.0
    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._state = {
            h: _HostState(h, Backoff(self.down_base_s, self.down_cap_s)) for h in self.hosts
        }
        self._all_down_since: float | None = None

    def candidates(self) -> list[str]:
        """Hosts to poll now: those not marked down, or whose down backoff is over."""
        now = self.clock()
        with self._lock:
            return [h for h, s in self._state.items() if s.down_until <= now]

    def mark_down(self, host: str, error: str) -> float:
        """``host`` did not answer: skip it for its next backoff delay (returned)."""
        now = self.clock()
        with self._lock:
            s = self._state[host]
            delay = s.backoff.next()
            s.down_until = now + delay
            s.error = error
            if self._all_down_since is None and all(
                x.down_until > now for x in self._state.values()
            ):
                self._all_down_since = now
        log.warning("event=direct_host_down host=%s error=%r retry_in_s=%.2f", host, error, delay)
        return delay

    def learn(self, polls: dict[str, Poll]) -> None:
        """Hosts that answered are up: their slots, their down backoff reset."""
        with self._lock:
            self._learn(polls)

    def _learn(self, polls: dict[str, Poll]) -> None:
        for host, p in polls.items():
            s = self._state[host]
            s.slots = p.slots
            s.backoff.reset()
            s.down_until = 0.0
            self._all_down_since = None

    def choose(self, polls: dict[str, Poll]) -> str | None:
        """The cheapest host under the threshold (random among equals), counted as in flight.

        None: every host that answered is busy (or none answered).
        """
        with self._lock:
            self._learn(polls)
            best: list[str] = []
            best_cost = 0.0
            for host, p in polls.items():
                s = self._state[host]
                running = max(p.running, s.inflight)
                cost = running / max(p.slots, 1) + p.surcharge
                if cost >= self.busy_threshold:
                    continue
                if not best or cost < best_cost - 1e-9:
                    best, best_cost = [host], cost
                elif abs(cost - best_cost) <= 1e-9:
                    best.append(host)
            if not best:
                return None
            host = best[0] if len(best) == 1 else self.rng.choice(best)
            self._state[host].inflight += 1
            return host

    def release(self, host: str) -> None:
        with self._lock:
            s = self._state[host]
            s.inflight = max(0, s.inflight - 1)

    def busy_backoff(self) -> Backoff:
        """A fresh backoff for one action that found every host busy."""
        return Backoff(self.busy_base_s, self.busy_cap_s)

    def next_retry_in(self) -> float:
        """Seconds until the first down host may be polled again (0: one may be now)."""
        now = self.clock()
        with self._lock:
            return max(0.0, min(s.down_until for s in self._state.values()) - now)

    def all_down_for(self) -> float:
        """How long every host has been down in a row (0: some host answered since)."""
        with self._lock:
            since = self._all_down_since
        return 0.0 if since is None else self.clock() - since

    def total_slots(self) -> int:
        with self._lock:
            return sum(s.slots or 0 for s in self._state.values())

    def errors(self) -> str:
        with self._lock:
            return "; ".join(f"{h}: {s.error or 'no answer'}" for h, s in self._state.items())


class DirectTransport:
    """HTTP to the agents' direct listeners (one keep-alive client for all threads)."""

    def __init__(
        self, token: str | None = None, poll_timeout_s: float = 1.0, tls: bool | None = None
    ) -> None:
        from herder.tlsconf import client_verify

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        # https:// hosts are verified against --ca / $HERDER_CA, else the system store.
        self.http = httpx.Client(
            headers=headers, limits=limits, timeout=None, verify=client_verify(True)
        )
        if tls is None:
            tls = os.environ.get(TLS_ENV, "").strip().lower() in ("1", "true", "yes", "on")
        self.scheme = "https" if tls else "http"
        self.poll_timeout = httpx.Timeout(poll_timeout_s)
        self.exec_timeout = httpx.Timeout(None, connect=max(poll_timeout_s, 2.0))
        # Digests each host said it has (or was sent): not asked about again.
        self._has: dict[str, set[str]] = {}
        self._has_lock = threading.Lock()

    def close(self) -> None:
        self.http.close()

    def base_url(self, host: str) -> str:
        return host if "://" in host else f"{self.scheme}://{host}"

    def _request(self, method: str, host: str, path: str, **kw: Any) -> httpx.Response:
        from herder.tlsconf import verify_error, verify_failure_line

        try:
            r = self.http.request(method, f"{self.base_url(host)}/direct{path}", **kw)
        except httpx.TransportError as exc:
            tls = verify_error(exc)
            if tls is not None:  # a wrong CA or certificate: waiting will not fix it
                raise HostRefused(verify_failure_line(self.base_url(host), tls)) from None
            raise HostDown(str(exc) or type(exc).__name__) from None
        if r.status_code in (401, 403):
            raise HostRefused(f"{host} refused this client: {_message(r)}")
        if r.status_code >= 500:
            raise HostDown(f"HTTP {r.status_code}: {_message(r)}")
        return r

    def poll(self, host: str) -> Poll:
        r = self._request("GET", host, "/cost", timeout=self.poll_timeout)
        if r.status_code != 200:
            raise HostDown(f"HTTP {r.status_code}: {_message(r)}")
        try:
            d = r.json()
            return Poll(int(d["running"]), int(d["slots"]), float(d["cost"]))
        except (ValueError, KeyError, TypeError):
            raise HostDown("not a herder direct listener (bad cost answer)") from None

    def ship(self, host: str, where: dict[str, Path]) -> None:
        """Send the blobs ``host`` lacks."""
        with self._has_lock:
            known = self._has.setdefault(host, set())
            ask = [d for d in where if d not in known]
        if not ask:
            return
        r = self._request(
            "POST", host, "/blobs/missing", json={"digests": ask}, timeout=self.exec_timeout
        )
        _check(host, r)
        missing = r.json()["missing"]
        for digest in missing:
            data = where[digest].read_bytes()
            if hashlib.sha256(data).hexdigest() != digest:
                raise BuildError(f"{where[digest]} changed while it was being sent")
            _check(host, self._request("PUT", host, f"/blobs/{digest}", content=data))
        with self._has_lock:
            known.update(ask)

    def forget(self, host: str) -> None:
        """``host`` lost blobs (409) or restarted: ask it again next time."""
        with self._has_lock:
            self._has.pop(host, None)

    def execute(self, host: str, body: dict[str, Any]) -> httpx.Response:
        return self._request("POST", host, "/execute", json=body, timeout=self.exec_timeout)

    def blob(self, host: str, digest: str) -> bytes:
        r = self._request("GET", host, f"/blobs/{digest}", timeout=self.exec_timeout)
        _check(host, r)
        return r.content


def _message(r: httpx.Response) -> str:
    try:
        d = r.json()
        return str(d.get("message") or d.get("error"))
    except ValueError:
        return r.text[:200] or f"HTTP {r.status_code}"


def _check(host: str, r: httpx.Response) -> None:
    if r.status_code != 200:
        raise BuildError(f"{host}: {_message(r)}")


class DirectBuild(Build):
    """A Rakefile build whose remote actions go straight to agents (module docstring)."""

    def __init__(
        self,
        hosts: list[str],
        rakefile: Rakefile,
        workdir: Path,
        reporter: Reporter,
        *,
        name: str = "build",
        picker: HostPicker | None = None,
        token: str | None = None,
        give_up_s: float | None = None,
    ) -> None:
        super().__init__(None, rakefile, workdir, reporter, name=name)  # type: ignore[arg-type]
        self.picker = picker or HostPicker(hosts)
        self.transport = DirectTransport(token if token is not None else os.environ.get(TOKEN_ENV))
        env_give_up = os.environ.get(GIVE_UP_ENV, "").strip()
        self.give_up_s = give_up_s if give_up_s is not None else float(env_give_up or 30.0)
        self._stop = threading.Event()
        self._polls = ThreadPoolExecutor(
            max_workers=min(64, 4 * len(hosts)), thread_name_prefix="poll"
        )
        self._hashed: dict[str, tuple[str, int, int]] = {}
        self._where: dict[str, Path] = {}

    def close(self) -> None:
        self._stop.set()
        self._polls.shutdown(wait=False, cancel_futures=True)
        self.transport.close()

    # ------------------------------------------------------------ per set

    def _submit(self, index: int, run: SetRun) -> int | None:
        """Hash the set's required files (nothing is submitted: there is no farm)."""
        self._hashed, self._where = self._hash_requires([a for a in run.actions if a.action.remote])
        return None

    def _run_set(self, index: int, run: SetRun) -> bool:
        self._submit(index, run)
        remote = [a for a in run.actions if a.action.remote]
        if remote:
            self._poll_all()  # learns the slots; a refusal stops here, before anything runs
        inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        locals_ = [LocalAction(a, self.workdir, inbox) for a in run.actions if not a.action.remote]
        for t in locals_:
            t.start()
            self.reporter.action_started(run, t.run_)
        pending = len(run.actions)
        failed = False
        error: BaseException | None = None
        pool: ThreadPoolExecutor | None = None
        if remote:
            workers = max(1, min(len(remote), self.picker.total_slots() or 1))
            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="direct")
            for a in remote:
                fut = pool.submit(self._remote, a, inbox)
                fut.add_done_callback(_to_inbox(inbox, a))
        refreshed = 0.0
        try:
            while pending and not failed:
                kind, item = inbox.get()
                if kind == "started":
                    self.reporter.action_started(run, item)
                elif kind == "local":
                    pending -= 1
                    failed |= not self._finished(run, item.run_)
                elif kind == "direct":
                    a, fut = item
                    if fut.cancelled():
                        continue
                    exc = fut.exception()
                    if exc is not None:
                        error, failed = exc, True
                        break
                    pending -= 1
                    failed |= not self._finished(run, a)
                now = time.monotonic()
                if inbox.empty() or now - refreshed >= 0.1:
                    refreshed = now
                    self.reporter.refresh(self.sets)
        finally:
            if failed or error is not None:
                self._stop.set()
                if pool is not None:
                    pool.shutdown(wait=False, cancel_futures=True)
                for t in locals_:
                    if t.is_alive():
                        t.kill()
                        t.join(5)
                for a in run.actions:
                    if a.state in ("queued", "running", "fetching"):
                        a.state = "cancelled"
            elif pool is not None:
                pool.shutdown(wait=True)
        if error is not None:
            raise error
        return not failed

    # --------------------------------------------------------- one action

    def _poll_all(self) -> None:
        """Poll every host once before a set: learns their slots; a refusal stops here."""
        self.picker.learn(self._poll_hosts(self.picker.candidates()))

    def _remote(self, a: ActionRun, inbox: queue.SimpleQueue[Any]) -> None:
        body: dict[str, Any] = {
            "name": a.label,
            "command": a.action.command,
            "requires": [
                {"path": p, "digest": self._hashed[p][0], "mode": self._hashed[p][2]}
                for p in a.action.requires
            ],
        }
        where = {self._hashed[p][0]: self._where[self._hashed[p][0]] for p in a.action.requires}
        busy = self.picker.busy_backoff()
        announced = False
        while not self._stop.is_set():
            hosts = self.picker.candidates()
            if not hosts:
                if self.picker.all_down_for() >= self.give_up_s:
                    raise BuildError(
                        f"no direct host answered for {self.give_up_s:g}s: {self.picker.errors()}"
                    )
                self._stop.wait(max(0.01, min(self.picker.next_retry_in(), 1.0)))
                continue
            polls = self._poll_hosts(hosts)
            host = self.picker.choose(polls)
            if host is None:
                if polls:  # every host busy: wait longer each time
                    delay = busy.next()
                    log.debug("event=direct_all_busy action=%s wait_s=%.3f", a.label, delay)
                    self._stop.wait(delay)
                continue
            try:
                if not announced:
                    a.state, a.started = "running", time.monotonic()
                    inbox.put(("started", a))
                    announced = True
                answer = self._send(host, body, where)
            except HostDown as exc:
                self.picker.mark_down(host, str(exc))
                self.transport.forget(host)
                log.warning("event=direct_resend action=%s host=%s", a.label, host)
                continue
            finally:
                self.picker.release(host)
            self._take(host, a, answer)
            return

    def _poll_hosts(self, hosts: list[str]) -> dict[str, Poll]:
        futs = {h: self._polls.submit(self.transport.poll, h) for h in hosts}
        polls: dict[str, Poll] = {}
        for h, fut in futs.items():
            try:
                polls[h] = fut.result()
            except HostDown as exc:
                self.picker.mark_down(h, str(exc))
        return polls

    def _send(self, host: str, body: dict[str, Any], where: dict[str, Path]) -> dict[str, Any]:
        for _ in range(3):
            self.transport.ship(host, where)
            r = self.transport.execute(host, body)
            if r.status_code == 409:  # a blob went missing between ship and execute
                self.transport.forget(host)
                continue
            if r.status_code != 200:
                raise BuildError(f"{host} would not run {body['name']}: {_message(r)}")
            answer: dict[str, Any] = r.json()
            return answer
        raise HostDown("kept losing the required files")

    def _take(self, host: str, a: ActionRun, answer: dict[str, Any]) -> None:
        a.finished = time.monotonic()
        a.stdout = answer.get("stdout") or ""
        a.stderr = answer.get("stderr") or ""
        a.exit_code = answer.get("exit_code")
        ok = answer.get("outcome") == "exited" and a.exit_code == 0
        if self._stop.is_set():
            return  # the build stopped meanwhile: write nothing more into the working directory
        if not ok:
            a.error = answer.get("error") or (
                _exit_text(a.exit_code) if a.exit_code is not None else answer.get("outcome")
            )
            a.state = "failed"
            return
        for o in answer.get("outputs") or []:
            data = (
                base64.b64decode(o["data"])
                if "data" in o
                else self.transport.blob(host, o["digest"])
            )
            if hashlib.sha256(data).hexdigest() != o["digest"]:
                raise HostDown(f"output {o['path']!r} arrived damaged")
            self._write(o["path"], data, int(o.get("mode", 0o644)))
        a.state = "succeeded"


def run_direct(
    hosts: list[str], rakefile: Rakefile, workdir: Path, reporter: Reporter, **kw: Any
) -> bool:
    build = DirectBuild(hosts, rakefile, workdir, reporter, **kw)
    try:
        return build.run()
    finally:
        with contextlib.suppress(Exception):
            build.close()


def _to_inbox(inbox: queue.SimpleQueue[Any], a: ActionRun) -> Callable[[Future[None]], None]:
    def done(fut: Future[None]) -> None:
        inbox.put(("direct", (a, fut)))

    return done
