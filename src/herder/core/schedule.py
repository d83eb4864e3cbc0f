"""The scheduler (DESIGN §8): one pure function over a snapshot, no database.

``schedule(candidates, agent, shares, n)`` picks at most ``n`` tasks for one
agent. The master's claim and autonomous agents' claims both call it: the
claim's SQL reads a bounded window of ready tasks that each fit the agent on
their own (its indexed scan, ``ORDER BY priority DESC, share_key, id``), and
this function makes the choice that needs the whole picture: what fits
*together*, and which owner is furthest below its share.

Order, as DESIGN §8 says:

1. **Eligibility** (each task on its own): what the agent accepts (owners,
   pools; empty means everyone), tags (a task's plain tags must all be on the
   agent; a ``!tag`` must not be), the agent's own limits (``max_ram_mb``;
   ``max_load``: an agent at or past it gets nothing new), resources against
   the agent's **free** capacity (below), and the blocklist.
2. **Job priority**: a higher priority is never passed over for a lower one
   that fits when it fits too.
3. **Fair share between owners**: among equal priorities, the owner whose
   slot-seconds over the recent window, divided by its weight, is lowest goes
   first; each pick charges the owner what one of its tasks is expected to
   use (``Shares.charge``), so picks spread across owners in proportion to
   their weights, within one call and (the store keeps the charges until it
   reads the slot-seconds again) across calls.
4. **Age**: the share key (the task's place in its owner's weighted queue,
   assigned at submission: :func:`share_keys`) and then the task id.

Free capacity. While an agent has free slots, what it has been offered and is
running is reserved: cpus (against ``max(cpus, slots)``: ``--slots`` above
the CPU count is the user's own choice of oversubscription), RAM (against
``ram_mb``, lowered by ``max_ram_mb``) and GPUs. Offers beyond the free slots
(claim-ahead, DESIGN §10) wait on the agent until a slot frees and the agent
starts them only when they fit then; so those are checked against the
capacity alone, never against what is reserved now.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

# The recent past that fair share looks at, and the slot charge of one pick
# of an owner whose attempts' durations are not known yet.
DEFAULT_SHARE_WINDOW_S = 600.0
DEFAULT_PICK_CHARGE_S = 60.0


@dataclass(frozen=True, slots=True)
class Candidate:
    """One ready task, as the claim's window read it."""

    id: int
    job_id: int
    priority: int
    owner: str = ""
    pool: str = "default"
    share_key: float = 0.0
    cpus: int = 1
    ram_mb: int = 0
    gpus: int = 0
    tags: tuple[str, ...] = ()
    blocked: bool = False  # the blocklist or retry-elsewhere rule keeps it off this agent


@dataclass(frozen=True, slots=True)
class AgentSnapshot:
    """One agent: its capacity, its own limits, what it holds now."""

    slots: int
    cpus: int
    ram_mb: int = 0  # 0: unknown, RAM is not accounted
    gpus: int = 0
    tags: frozenset[str] = frozenset()
    max_ram_mb: int | None = None
    max_load: float | None = None
    load: float | None = None
    held: int = 0  # tasks offered to it or running on it
    used_cpus: int = 0
    used_ram_mb: int = 0
    used_gpus: int = 0
    accept_owners: frozenset[str] = frozenset()
    accept_pools: frozenset[str] = frozenset()

    @property
    def cpu_capacity(self) -> int:
        return max(self.cpus, self.slots)

    @property
    def ram_capacity(self) -> int:
        """0 when RAM is not accounted (neither a total nor a limit is known)."""
        if self.max_ram_mb is not None and self.max_ram_mb > 0:
            return min(self.ram_mb, self.max_ram_mb) if self.ram_mb > 0 else self.max_ram_mb
        return self.ram_mb

    @property
    def overloaded(self) -> bool:
        return self.max_load is not None and self.load is not None and self.load >= self.max_load


@dataclass(frozen=True, slots=True)
class Shares:
    """Owners' weights (default 1), their slot-seconds over the window, and what one
    pick of theirs is expected to cost (their attempts' mean duration)."""

    weights: Mapping[str, float] = field(default_factory=dict)
    used_s: Mapping[str, float] = field(default_factory=dict)
    charge_s: Mapping[str, float] = field(default_factory=dict)
    pick_charge_s: float = DEFAULT_PICK_CHARGE_S

    def weight(self, owner: str) -> float:
        w = self.weights.get(owner, 1.0)
        return w if w > 0 else 1.0

    def charge(self, owner: str) -> float:
        """Slot-seconds one more task of ``owner`` is expected to use."""
        return self.charge_s.get(owner, self.pick_charge_s)


def tags_fit(task_tags: Iterable[str], agent_tags: frozenset[str]) -> bool:
    """Every plain tag is on the agent and no ``!tag`` is."""
    for tag in task_tags:
        if tag.startswith("!"):
            if tag[1:] in agent_tags:
                return False
        elif tag not in agent_tags:
            return False
    return True


def accepts(agent: AgentSnapshot, owner: str, pool: str) -> bool:
    """What the agent's configuration says it takes (empty lists: everything)."""
    if agent.accept_owners and owner not in agent.accept_owners:
        return False
    return not (agent.accept_pools and pool not in agent.accept_pools)


def fits_alone(task: Candidate, agent: AgentSnapshot) -> bool:
    """Could the agent ever run ``task``: tags, acceptance, limits, capacity."""
    if task.blocked or not tags_fit(task.tags, agent.tags):
        return False
    if not accepts(agent, task.owner, task.pool):
        return False
    if task.cpus > agent.cpu_capacity or task.gpus > agent.gpus:
        return False
    ram = agent.ram_capacity
    return not (ram > 0 and task.ram_mb > ram)


@dataclass(slots=True)
class _Free:
    slots: int
    cpus: int
    ram_mb: int
    gpus: int
    ram_accounted: bool

    def fits(self, task: Candidate) -> bool:
        if task.cpus > self.cpus or task.gpus > self.gpus:
            return False
        return not (self.ram_accounted and task.ram_mb > self.ram_mb)

    def take(self, task: Candidate) -> None:
        self.slots -= 1
        self.cpus -= task.cpus
        self.ram_mb -= task.ram_mb
        self.gpus -= task.gpus


def free_capacity(agent: AgentSnapshot) -> _Free:
    ram = agent.ram_capacity
    return _Free(
        slots=agent.slots - agent.held,
        cpus=agent.cpu_capacity - agent.used_cpus,
        ram_mb=ram - agent.used_ram_mb,
        gpus=agent.gpus - agent.used_gpus,
        ram_accounted=ram > 0,
    )


def schedule(
    candidates: Sequence[Candidate], agent: AgentSnapshot, shares: Shares, n: int
) -> list[Candidate]:
    """At most ``n`` of ``candidates`` for ``agent``, in the order they should start."""
    if n <= 0 or agent.overloaded:
        return []
    eligible = [c for c in candidates if fits_alone(c, agent)]
    if not eligible:
        return []
    free = free_capacity(agent)
    used = dict(shares.used_s)
    # Per owner, its tasks in age order; the heads compete (priority, share, age).
    by_owner: dict[str, list[Candidate]] = {}
    for c in sorted(eligible, key=lambda c: (-c.priority, c.share_key, c.id)):
        by_owner.setdefault(c.owner, []).append(c)
    picked: list[Candidate] = []
    while len(picked) < n and by_owner:
        within_slots = free.slots > 0
        best: Candidate | None = None
        best_key: tuple[float, float, float, int] | None = None
        for owner, queue in by_owner.items():
            # The owner's first task that fits now (a big one waiting does not
            # hold back its smaller ones behind it).
            head = next((c for c in queue if not within_slots or free.fits(c)), None)
            if head is None:
                continue
            key = (
                -head.priority,
                used.get(owner, 0.0) / shares.weight(owner),
                head.share_key,
                head.id,
            )
            if best_key is None or key < best_key:
                best, best_key = head, key
        if best is None:
            break
        picked.append(best)
        if within_slots:
            free.take(best)
        else:
            free.slots -= 1
        used[best.owner] = used.get(best.owner, 0.0) + shares.charge(best.owner)
        queue = by_owner[best.owner]
        queue.remove(best)
        if not queue:
            del by_owner[best.owner]
    return picked


def share_keys(start: float, weight: float, count: int) -> list[float]:
    """Places in an owner's weighted queue for ``count`` new tasks (start-time fair queuing).

    Each task advances its owner's virtual clock by ``1 / weight``: interleaved
    by the claim's ``ORDER BY share_key``, owners with weights 2:1 get their
    ready tasks dispatched 2:1. ``start`` is ``max(owner's clock, the farm's
    clock)`` so an owner who was idle does not bank credit.
    """
    step = 1.0 / (weight if weight > 0 else 1.0)
    return [start + step * (i + 1) for i in range(count)]
