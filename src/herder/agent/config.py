"""The agent's configuration and the small pieces every room of the agent uses.

``AgentConfig`` (what ``herder agent`` and ``LocalFarm`` set), the default
state directory, and ``Backoff`` (capped exponential backoff with jitter).
"""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ssl

    from herder.agent.direct import DirectConfig


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return Path(base) / "herder-agent"


def _ram_mb() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().total // (1024 * 1024))
    except Exception:  # pragma: no cover
        return 0


def _ram_tolerance() -> float:
    from herder.agent.watch import ram_tolerance_from_env

    return ram_tolerance_from_env()


CLAIM_AHEAD_MAX = 64  # default window cap (offers claimed beyond the slots)


@dataclass
class AgentConfig:
    masters: list[str]
    slots: int = field(default_factory=lambda: os.cpu_count() or 1)
    tags: list[str] = field(default_factory=list)
    # Whose work it takes (herder.core.acl.agent_accepts): only tasks of jobs of
    # these owners and in these pools; empty: everyone's, every pool.
    accept_owners: list[str] = field(default_factory=list)
    accept_pools: list[str] = field(default_factory=list)
    name: str = field(default_factory=socket.gethostname)
    state_dir: Path = field(default_factory=default_state_dir)
    work_root: Path | None = None  # default: state_dir / "work"
    poll_wait_s: float = 20.0  # long-poll length of an idle claim
    heartbeat_interval_s: float | None = None  # default: lease_s / 3
    drain_timeout_s: float = 30.0  # on SIGTERM, let running tasks finish this long
    kill_grace_s: float = 2.0  # SIGTERM → SIGKILL delay for timeouts and cancels
    # A task is killed past ram_mb x (1 + this) (herder.agent.watch; $HERDER_RAM_TOLERANCE).
    ram_tolerance: float = field(default_factory=lambda: _ram_tolerance())
    log_interval_s: float = 0.5
    ack_delay_s: float = 1.0  # how long an ack may wait for a claim to carry it
    request_timeout_s: float = 30.0
    backoff_base_s: float = 0.25
    backoff_max_s: float = 30.0
    delivery_timeout_s: float = 30.0  # after draining, how long to keep trying to deliver
    journal_min_s: float = 1.0  # journal a completion before sending when the task ran this long
    inline_outputs: bool = True  # small outputs ride in the completion (no blob requests)
    # A completion waits up to batch_wait_s for attempts that started less than
    # batch_young_s ago (likely short ones) to finish, so that one request
    # carries them all (DESIGN §10). Long-running siblings never delay it.
    batch_wait_s: float = 0.01
    batch_young_s: float = 0.1
    # Claim-ahead window (DESIGN §10): while recent tasks are short (the median
    # of the last ``claim_ahead_samples`` run times below ``claim_ahead_short_s``,
    # and no running attempt older than that), claim beyond the slots, so that
    # a slot that finishes starts the next offer at once: as many as the slots
    # run in two claim round trips, at least ``slots``, at most ``claim_ahead``.
    # None: $HERDER_CLAIM_AHEAD, else 32 times slots (at most CLAIM_AHEAD_MAX); 0: off.
    claim_ahead: int | None = None
    claim_ahead_short_s: float = 0.25
    claim_ahead_samples: int = 8
    # While more than half the window waits in the ready queue, a completion
    # waits up to ahead_wait_s for others to share its request.
    ahead_wait_s: float = 0.05
    token: str | None = None
    # A join token (issue 11, herder.agent.credentials): registers this agent once;
    # the master answers with the agent's own token, kept in the state dir.
    join_token: str | None = field(
        default_factory=lambda: os.environ.get("HERDER_JOIN_TOKEN", "").strip() or None
    )
    verify: bool | str = True
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    ram_mb: int = field(default_factory=_ram_mb)
    gpus: int = 0
    # The agent's own limits (seeds/001; herder.core.schedule): the most RAM the
    # farm may use here, and a 1-minute load at which it takes nothing new.
    max_ram_mb: int | None = None
    max_load: float | None = None
    env: dict[str, str] | None = None  # base environment of tasks (default: the agent's)
    # Talkback endpoint (herder.agent.talkback): HOST:PORT to listen on (port 0:
    # a free one), None: no endpoint. Its URL and token go to the master at
    # registration; a fresh random token per start unless talkback_token is set.
    talkback: str | None = "127.0.0.1:0"
    talkback_token: str | None = None
    # HTTPS on the talkback endpoint (herder.tlsconf): a PEM certificate chain
    # and its key; None: plain HTTP. The direct listener has its own in DirectConfig.
    tls_cert: str | None = None
    tls_key: str | None = None
    # Finding masters and autonomous mode (herder.agent.autonomous, DESIGN §6).
    dns_name: str | None = None  # DNS alias of the masters (SRV _herder._tcp.<name>, A/AAAA)
    resolver: str | None = None  # HOST:PORT of the DNS server to ask (default: the system's)
    srv: bool | None = None  # None: SRV then A/AAAA; True: SRV only; False: A/AAAA only
    self_assign: bool = False  # claim from the database when every master is down
    db_url: str | None = None  # the farm's database (needed for self-assignment)
    return_policy: str = "per-task"  # per-task | interval:SECONDS | never
    rehome_s: float = 60.0  # start again from the first candidate master this often
    # Direct execution (herder.agent.direct, DESIGN §9): a DirectConfig, or None: no listener.
    direct: DirectConfig | None = None

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).expanduser()
        if self.work_root is None:
            self.work_root = self.state_dir / "work"
        self.work_root = Path(self.work_root).expanduser()
        if isinstance(self.masters, str):
            self.masters = [self.masters]
        if self.slots < 1:
            raise ValueError("slots must be at least 1")
        if self.claim_ahead is None:
            env = os.environ.get("HERDER_CLAIM_AHEAD", "").strip()
            if env and not env.isdigit():
                raise ValueError(f"HERDER_CLAIM_AHEAD={env!r}: expected a whole number (0: off)")
            self.claim_ahead = int(env) if env else min(32 * self.slots, CLAIM_AHEAD_MAX)
        if self.claim_ahead < 0:
            raise ValueError("claim_ahead must be 0 (off) or more")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")

    def server_tls(self) -> ssl.SSLContext | None:
        """The talkback endpoint's TLS context (None: plain HTTP); TlsConfigError if unusable."""
        if not self.tls_cert or not self.tls_key:
            return None
        from herder.tlsconf import server_context

        return server_context(self.tls_cert, self.tls_key)


class Backoff:
    """Capped binary exponential backoff with jitter (seeds/003)."""

    def __init__(self, base: float, cap: float) -> None:
        self.base = base
        self.cap = cap
        self.n = 0

    def next(self, at_least: float | None = None) -> float:
        d = min(self.cap, self.base * (2**self.n))
        self.n = min(self.n + 1, 30)
        delay: float = d / 2 + random.uniform(0, d / 2)
        return max(delay, at_least or 0.0)

    def reset(self) -> None:
        self.n = 0


def retry_after(exc: BaseException) -> float | None:
    """The delay a failed request's answer asked for (HTTP 429/503 Retry-After), if any."""
    value = getattr(exc, "retry_after", None)
    return float(value) if isinstance(value, int | float) else None


__all__ = ["CLAIM_AHEAD_MAX", "AgentConfig", "Backoff", "default_state_dir", "retry_after"]
