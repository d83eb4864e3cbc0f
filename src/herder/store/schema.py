"""SQLAlchemy Core schema of the herder store (DESIGN §2, §5, §10).

Migrations in ``herder/store/migrations`` must produce exactly this schema;
``tests/integration/test_migrations.py`` checks it on SQLite and PostgreSQL.

Notes on the hot path (DESIGN §10):

- ``tasks.priority`` is the job's priority, copied onto each task so that the
  claim is one scan of one partial index, ``ix_tasks_claim`` on
  ``(priority DESC, share_key, id) WHERE state = 'queued' AND placement = 'remote'``,
  whatever the length of the queue.
- ``stages.remaining`` counts the stage's tasks not yet succeeded, so that
  the completion of a task knows in O(1) whether it finished its stage.
- ``attempts.stdout_len``/``stderr_len`` give log offsets without a scan.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """A UTC timestamp: stored naive (UTC), returned timezone-aware (UTC)."""

    impl = sa.DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # defensive: a value written by raw SQL on SQLite
            value = datetime.fromisoformat(value)
        assert isinstance(value, datetime)
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
    }
)

_QUEUED_REMOTE = sa.text("state = 'queued' AND placement = 'remote'")
_ACTIVE = sa.text("state IN ('offered', 'running')")

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("owner", sa.String(200), nullable=True),
    sa.Column("pool", sa.String(200), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("idempotency_key", sa.String(200), nullable=True, unique=True),
    sa.Column("stage_count", sa.Integer, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("finished_at", UTCDateTime, nullable=True),
    # Issue 13 (herder.store.deps): what a failed parent does to this job
    # ("fail" or "hold"), and the order its stages dispatch their tasks in.
    sa.Column("on_parent_failure", sa.String(8), nullable=False, server_default="fail"),
    sa.Column("frame_order", sa.String(32), nullable=False, server_default="sequential"),
    sa.Index("ix_jobs_state_id", "state", "id"),
    # Retention (herder.store.retention): finished jobs oldest first; only a
    # finished job has finished_at, and the state check reads the index alone.
    sa.Index("ix_jobs_finished_at_state", "finished_at", "state"),
)

# depends_on (herder.store.deps): job_id waits for parent_id. Parents exist
# before their children, so the graph has no cycle; the index finds a
# finished job's children.
job_deps = sa.Table(
    "job_deps",
    metadata,
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column(
        "parent_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Index("ix_job_deps_parent_id", "parent_id"),
)

# Inputs not uploaded yet of a job submitted with ``inputs=later``
# (herder.store.inputs): the job waits until none is left; the index finds
# the jobs an upload completes.
job_inputs = sa.Table(
    "job_inputs",
    metadata,
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("digest", sa.String(64), primary_key=True),
    sa.Index("ix_job_inputs_digest", "digest"),
)

stages = sa.Table(
    "stages",
    metadata,
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("position", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("task_count", sa.Integer, nullable=False),
    sa.Column("remaining", sa.Integer, nullable=False),
)

tasks = sa.Table(
    "tasks",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    sa.Column("stage", sa.Integer, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("name", sa.String(200), nullable=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("command", sa.JSON, nullable=False),
    sa.Column("placement", sa.String(16), nullable=False),
    sa.Column("requires", sa.JSON, nullable=False),
    sa.Column("outputs", sa.JSON, nullable=True),
    sa.Column("env", sa.JSON, nullable=False),
    sa.Column("tags", sa.JSON, nullable=False),
    sa.Column("timeout_s", sa.Float, nullable=True),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("cpus", sa.Integer, nullable=False),
    sa.Column("ram_mb", sa.Integer, nullable=False),
    sa.Column("attempt_count", sa.Integer, nullable=False, server_default="0"),
    sa.Column("failures", sa.Integer, nullable=False, server_default="0"),
    sa.Column("infra_failures", sa.Integer, nullable=False, server_default="0"),
    sa.Column("exit_code", sa.Integer, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("agent_id", sa.String(100), nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("finished_at", UTCDateTime, nullable=True),
    # The agent its last attempt failed on (herder.core.rules: retry elsewhere first).
    sa.Column("last_failed_agent_id", sa.String(100), nullable=True),
    # Issue 13, herder.agent.watch: a regex whose one group is the progress
    # (0-100) in the task's output; kill after this long without output;
    # memory failures so far (their own budget: herder.core.rules).
    sa.Column("progress_pattern", sa.Text, nullable=True),
    sa.Column("stuck_timeout_s", sa.Float, nullable=True),
    sa.Column("memory_failures", sa.Integer, nullable=False, server_default="0"),
    sa.Column("gpus", sa.Integer, nullable=False, server_default="0"),
    # The task's place in its owner's weighted queue (herder.core.schedule.share_keys).
    sa.Column("share_key", sa.Float, nullable=False, server_default="0"),
    sa.Index("ix_tasks_job_id_stage_state", "job_id", "stage", "state"),
    sa.Index(
        "ix_tasks_claim",
        sa.desc("priority"),
        "share_key",
        "id",
        sqlite_where=_QUEUED_REMOTE,
        postgresql_where=_QUEUED_REMOTE,
    ),
)

task_tags = sa.Table(
    "task_tags",
    metadata,
    sa.Column(
        "task_id", sa.Integer, sa.ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column("tag", sa.String(200), primary_key=True),
)

attempts = sa.Table(
    "attempts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("task_id", sa.Integer, sa.ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False),
    sa.Column("number", sa.Integer, nullable=False),
    sa.Column("agent_id", sa.String(100), nullable=True),
    sa.Column("token", sa.String(100), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("exit_code", sa.Integer, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("offered_at", UTCDateTime, nullable=True),
    sa.Column("ack_deadline", UTCDateTime, nullable=True),
    sa.Column("started_at", UTCDateTime, nullable=True),
    sa.Column("lease_expires_at", UTCDateTime, nullable=True),
    sa.Column("finished_at", UTCDateTime, nullable=True),
    sa.Column("outputs", sa.JSON, nullable=True),
    sa.Column("stdout_len", sa.Integer, nullable=False, server_default="0"),
    sa.Column("stderr_len", sa.Integer, nullable=False, server_default="0"),
    # Issue 13: the latest progress (0-100) its agent reported, and the highest
    # RSS (MB) of its process group the agent's watch saw.
    sa.Column("progress", sa.Float, nullable=True),
    sa.Column("peak_rss_mb", sa.Integer, nullable=True),
    sa.UniqueConstraint("task_id", "number"),
    # Only attempts in flight are in this index: the reaper and heartbeats scan it.
    sa.Index(
        "ix_attempts_active_agent_id",
        "agent_id",
        sqlite_where=_ACTIVE,
        postgresql_where=_ACTIVE,
    ),
    # Fair share reads the slot-seconds of attempts finished within its window.
    sa.Index("ix_attempts_finished_at", "finished_at"),
)

log_chunks = sa.Table(
    "log_chunks",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "attempt_id",
        sa.Integer,
        sa.ForeignKey("attempts.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("stream", sa.String(8), nullable=False),
    sa.Column("start_offset", sa.Integer, nullable=False),
    sa.Column("end_offset", sa.Integer, nullable=False),
    sa.Column("data", sa.Text, nullable=False),
    sa.Index("ix_log_chunks_attempt_id_stream_end_offset", "attempt_id", "stream", "end_offset"),
)

agents = sa.Table(
    "agents",
    metadata,
    sa.Column("id", sa.String(100), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("hostname", sa.String(255), nullable=False),
    sa.Column("slots", sa.Integer, nullable=False),
    sa.Column("tags", sa.JSON, nullable=False),
    sa.Column("cpus", sa.Integer, nullable=False),
    sa.Column("ram_mb", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("talkback_url", sa.Text, nullable=True),
    # Bearer token of the agent's talkback endpoint (never part of AgentView).
    sa.Column("talkback_token", sa.Text, nullable=True),
    sa.Column("version", sa.String(100), nullable=True),
    sa.Column("registered_at", UTCDateTime, nullable=False),
    sa.Column("last_seen_at", UTCDateTime, nullable=True),
    sa.Column("usage", sa.JSON, nullable=True),
    # Set by `herder drain` (POST /agents/{id}/drain); kept until undrained.
    sa.Column("drain_requested", sa.Boolean, nullable=False, server_default=sa.false()),
    # "master" or "autonomous" (claiming from the database itself), from its heartbeats.
    sa.Column("mode", sa.String(16), nullable=False, server_default="master"),
    # Whose work it takes (herder.core.acl.agent_accepts): JSON lists of owners
    # and pools from its registration; NULL or empty: everyone's.
    sa.Column("accept_owners", sa.JSON, nullable=True),
    sa.Column("accept_pools", sa.JSON, nullable=True),
    sa.Column("gpus", sa.Integer, nullable=False, server_default="0"),
    # The agent's own limits (seeds/001), from its configuration or PATCH /agents/{id}.
    sa.Column("max_ram_mb", sa.Integer, nullable=True),
    sa.Column("max_load", sa.Float, nullable=True),
)

# Fair share between owners (herder.core.schedule): a weight, and the owner's
# virtual clock, the share key its last submitted task got.
owner_shares = sa.Table(
    "owner_shares",
    metadata,
    sa.Column("owner", sa.String(200), primary_key=True),
    sa.Column("weight", sa.Float, nullable=False, server_default="1"),
    sa.Column("clock", sa.Float, nullable=False, server_default="0"),
)

# herder.core.rules.BlocklistPolicy: strikes of an agent on a job, and the block.
agent_job_failures = sa.Table(
    "agent_job_failures",
    metadata,
    sa.Column("agent_id", sa.String(100), primary_key=True),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("failures", sa.Integer, nullable=False),
    sa.Column("last_failure_at", UTCDateTime, nullable=True),
    sa.Column("blocked_until", UTCDateTime, nullable=True),
)

# Maintenance (lease reaping) on one master at a time: a lock row with a
# timeout judged by the database clock (DESIGN §5).
maintenance_lock = sa.Table(
    "maintenance_lock",
    metadata,
    sa.Column("name", sa.String(50), primary_key=True),
    sa.Column("holder", sa.String(200), nullable=False),
    sa.Column("expires_at", UTCDateTime, nullable=False),
)

# created_at: when the blob was stored, or last reported present to a client
# (herder.store.blobs): the collector's grace for uploads that no job
# references yet runs from it.
blobs = sa.Table(
    "blobs",
    metadata,
    sa.Column("digest", sa.String(64), primary_key=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    # Last: SQLite's incremental blob I/O then writes the bytes in place; with a
    # column after it, every write rebuilds the whole row in memory.
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.Index("ix_blobs_created_at", "created_at"),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", UTCDateTime, nullable=False),
    sa.Column("job_id", sa.Integer, nullable=True),
    sa.Column("task_id", sa.Integer, nullable=True),
    sa.Column("attempt_id", sa.Integer, nullable=True),
    sa.Column("agent_id", sa.String(100), nullable=True),
    sa.Column("kind", sa.String(50), nullable=False),
    sa.Column("from_state", sa.String(16), nullable=True),
    sa.Column("to_state", sa.String(16), nullable=True),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Index("ix_events_job_id_id", "job_id", "id"),
    sa.Index("ix_events_task_id_id", "task_id", "id"),
)

# The master directory (DESIGN §4, §6; seeds/000, seeds/001): one row per
# master, upserted by its heartbeat (database clock). Visibility is
# herder.core.rules.master_visible.
masters = sa.Table(
    "masters",
    metadata,
    sa.Column("id", sa.String(200), primary_key=True),  # hostname:listen-host:port
    sa.Column("url", sa.Text, nullable=False),  # what agents and clients use
    sa.Column("role", sa.String(16), nullable=False, server_default="read-write"),
    sa.Column("state", sa.String(16), nullable=False),  # up, failed, stopped (as last written)
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("last_heartbeat_at", UTCDateTime, nullable=False),
    # Its own timeout (it knows its heartbeat interval), judged by the database clock.
    sa.Column("heartbeat_timeout_s", sa.Float, nullable=False),
    sa.Column("requests", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("unhandled_exceptions", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("avg_request_ms", sa.Float, nullable=False, server_default="0"),
    sa.Column("in_flight", sa.Integer, nullable=False, server_default="0"),
    sa.Column("version", sa.String(100), nullable=True),
    sa.Column("failures", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_failure_at", UTCDateTime, nullable=True),
)

# Failures to reach a master, reported by agents and clients
# (POST /api/v1/masters/{id}/failures).
master_failures = sa.Table(
    "master_failures",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "master_id",
        sa.String(200),
        sa.ForeignKey("masters.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("reported_at", UTCDateTime, nullable=False),  # the reporter's clock ("time")
    sa.Column("received_at", UTCDateTime, nullable=False),  # the database clock
    sa.Column("reporter", sa.String(200), nullable=False),
    sa.Column("request", sa.String(500), nullable=False),
    sa.Column("kind", sa.String(50), nullable=False),
    sa.Column("url", sa.Text, nullable=True),
    sa.Index("ix_master_failures_master_id_id", "master_id", "id"),
)

# Users and API tokens (issue 11, DESIGN §11; herder.store.auth). A token's
# secret is never stored: only its sha256, compared in constant time.
users = sa.Table(
    "users",
    metadata,
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("role", sa.String(16), nullable=False),  # admin, submitter, viewer
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false()),
)

tokens = sa.Table(
    "tokens",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),  # the <id> of hdr_<id>_<secret>
    sa.Column("kind", sa.String(16), nullable=False),  # user, join, agent
    sa.Column(
        "user_name",
        sa.String(100),
        sa.ForeignKey("users.name", ondelete="CASCADE"),
        nullable=True,
    ),
    sa.Column("agent_id", sa.String(100), nullable=True),  # kind agent: the agent it acts as
    sa.Column("secret_sha256", sa.String(64), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("created_by", sa.String(100), nullable=True),
    sa.Column("expires_at", UTCDateTime, nullable=True),
    sa.Column("revoked_at", UTCDateTime, nullable=True),
    sa.Column("description", sa.String(200), nullable=True),
    # One live token per agent: a second join under the same id fails here,
    # whichever master runs it, instead of by a read-then-write.
    sa.Index(
        "ix_tokens_agent_id",
        "agent_id",
        unique=True,
        sqlite_where=sa.text("kind = 'agent' AND revoked_at IS NULL"),
        postgresql_where=sa.text("kind = 'agent' AND revoked_at IS NULL"),
    ),
)

# Pool ACLs (issue 11, seeds/002; herder.store.acl): the owners allowed to
# submit to a pool, a JSON list (``*``: everyone). No row: everyone.
pool_acls = sa.Table(
    "pool_acls",
    metadata,
    sa.Column("pool", sa.String(200), primary_key=True),
    sa.Column("allow", sa.JSON, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

# One row (id 1): bumped by every ACL write, so that a claim checks the queue
# against the ACLs only when they changed since its store last did.
acl_version = sa.Table(
    "acl_version",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("version", sa.BigInteger, nullable=False),
)
