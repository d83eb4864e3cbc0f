"""The Alembic migrations produce exactly the schema of herder.store.schema (SQLite and PostgreSQL)."""

from __future__ import annotations

import warnings

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from herder.store import Store
from herder.store.schema import metadata
from herder.store.sql import HotSql

HEAD = "0011"


def _skip_sqlite_expression_index(
    obj: object, name: str | None, type_: str, reflected: bool, compare_to: object
) -> bool:
    # SQLite reflects ix_tasks_claim (priority DESC, id) without its DESC and alembic
    # cannot compare expression indexes there; test_sqlite_claim_index checks its DDL.
    return not (type_ == "index" and name == "ix_tasks_claim")


def _diff(url: str) -> list[object]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*expression-based index.*")
            opts: dict[str, object] = {"compare_type": True}
            if engine.dialect.name == "sqlite":
                opts["include_object"] = _skip_sqlite_expression_index
            ctx = MigrationContext.configure(conn, opts=opts)
            return list(compare_metadata(ctx, metadata))
    finally:
        engine.dispose()


def _indexes(url: str, table: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return {str(ix["name"]) for ix in sa.inspect(engine).get_indexes(table)}
    finally:
        engine.dispose()


def test_migrated_schema_equals_models(db_url: str) -> None:
    store = Store.open(db_url, migrate=False)
    store.migrate(HEAD)  # an explicit revision: every migration, through Alembic
    store.close()
    assert _diff(db_url) == []
    assert "ix_tasks_claim" in _indexes(db_url, "tasks")
    assert "ix_attempts_active_agent_id" in _indexes(db_url, "attempts")


def _schema(url: str) -> dict[str, object]:
    engine = sa.create_engine(url)
    try:
        insp = sa.inspect(engine)
        out: dict[str, object] = {}
        for table in sorted(insp.get_table_names()):
            out[table] = (
                sorted((c["name"], str(c["type"]), c["nullable"]) for c in insp.get_columns(table)),
                sorted(i["name"] or "" for i in insp.get_indexes(table)),
                sorted(u["name"] or "" for u in insp.get_unique_constraints(table)),
                insp.get_pk_constraint(table)["constrained_columns"],
                sorted(f["referred_table"] for f in insp.get_foreign_keys(table)),
            )
        return out
    finally:
        engine.dispose()


def test_fresh_database_is_created_at_head_like_the_migrations(
    db_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    """A store opened on an empty database creates the head schema without Alembic;
    it is the schema the migrations build, and it is stamped at head."""
    import alembic.command

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("an empty database was migrated step by step")

    monkeypatch.setattr(alembic.command, "upgrade", refuse)
    Store.open(db_url).close()
    monkeypatch.undo()
    assert _diff(db_url) == []
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            assert (
                conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one()
                == HEAD
            )
    finally:
        engine.dispose()
    if db_url.startswith("sqlite"):
        migrated = f"sqlite:///{tmp_path}/migrated.db"
        store = Store.open(migrated, migrate=False)
        store.migrate(HEAD)
        store.close()
        assert _schema(db_url) == _schema(migrated)


def test_migrate_is_idempotent(db_url: str) -> None:
    Store.open(db_url, migrate=True).close()
    store = Store.open(db_url, migrate=True)
    try:
        with store.engine.connect() as conn:
            version = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one()
        assert version == HEAD
    finally:
        store.close()


def test_empty_database_differs_from_models(db_url: str) -> None:
    """The comparison is not vacuous: an unmigrated database shows every table missing."""
    Store.open(db_url, migrate=False).close()
    tables = {d[1].name for d in _diff(db_url) if isinstance(d, tuple) and d[0] == "add_table"}
    assert {"jobs", "tasks", "attempts", "agents", "blobs", "events"} <= tables
    assert {"masters", "master_failures"} <= tables


@pytest.mark.parametrize("through", ["created", "migrated"])
def test_sqlite_claim_index(tmp_path: object, through: str) -> None:
    url = f"sqlite:///{tmp_path}/claim.db"
    if through == "created":
        Store.open(url).close()
    else:
        store = Store.open(url, migrate=False)
        store.migrate(HEAD)
        store.close()
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            ddl = conn.execute(
                sa.text("SELECT sql FROM sqlite_master WHERE name = 'ix_tasks_claim'")
            ).scalar_one()
            # The claim's own window statement: one walk of the index, no sort.
            params = {
                "tags": "[]",
                "negated": "[]",
                "cpus": 2,
                "gpus": 0,
                "ram": 0,
                "n": 5,
                "agent_id": "a",
                "now": "2026-01-01 00:00:00.000000",
                "live_since": "2026-01-01 00:00:00.000000",
                "retry_before": "2026-01-01 00:00:00.000000",
                "any_owner": 1,
                "accept_owners": "[]",
                "any_pool": 1,
                "accept_pools": "[]",
            }
            plan = " ".join(
                str(r[-1])
                for r in conn.exec_driver_sql(
                    "EXPLAIN QUERY PLAN " + HotSql(is_pg=False).offer_window, params
                )
            )
    finally:
        engine.dispose()
    normalized = " ".join(ddl.split())
    assert "priority DESC, share_key, id" in normalized
    assert "WHERE state = 'queued' AND placement = 'remote'" in normalized
    assert "ix_tasks_claim" in plan and "TEMP B-TREE" not in plan


def test_upgrade_0001_to_head_keeps_rows(db_url: str) -> None:
    """0002 adds columns with defaults to tables that already hold rows."""
    store = Store.open(db_url, migrate=False)
    try:
        store.migrate("0001")
        with store.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO agents (id, name, hostname, slots, tags, cpus, ram_mb, state,"
                    " registered_at) VALUES ('old', 'old', 'h', 1, '[]', 1, 0, 'online',"
                    " CURRENT_TIMESTAMP)"
                )
            )
        store.migrate()
        agent = store.get_agent("old")
        assert agent.state in ("online", "offline")
        with store.engine.connect() as conn:
            drain = conn.execute(
                sa.text("SELECT drain_requested FROM agents WHERE id = 'old'")
            ).scalar_one()
            version = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar_one()
        assert not drain and version == HEAD
        store.set_drain("old", True)
        with store.engine.connect() as conn:
            assert conn.execute(
                sa.text("SELECT drain_requested FROM agents WHERE id = 'old'")
            ).scalar_one()
    finally:
        store.close()
    assert _diff(db_url) == []


def test_upgrade_0002_to_head_keeps_agents(db_url: str) -> None:
    """0003 adds agents.mode (default "master") and the master directory tables."""
    store = Store.open(db_url, migrate=False)
    try:
        store.migrate("0002")
        with store.engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO agents (id, name, hostname, slots, tags, cpus, ram_mb, state,"
                    " registered_at) VALUES ('old', 'old', 'h', 1, '[]', 1, 0, 'online',"
                    " CURRENT_TIMESTAMP)"
                )
            )
        store.migrate()
        assert store.get_agent("old").mode == "master"
        assert store.list_masters(include_all=True) == []
    finally:
        store.close()
    assert _diff(db_url) == []


def test_head_revision_constant_names_alembics_head() -> None:
    from alembic.script import ScriptDirectory

    from herder.store import engine as store_engine

    script = ScriptDirectory.from_config(store_engine.alembic_config())
    assert script.get_current_head() == store_engine.HEAD_REVISION == HEAD


def test_a_current_store_opens_without_running_alembic(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    Store.open(db_url).close()  # migrated to head

    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("alembic ran on a store that is already at head")

    import alembic.command

    monkeypatch.setattr(alembic.command, "upgrade", refuse)
    store = Store.open(db_url)
    try:
        assert store.list_jobs() == []
    finally:
        store.close()
