"""The herder store: SQLAlchemy Core schema, Alembic migrations and ``Store``.

All SQL of the farm lives in this package (docs/architecture.md, "Store interface").
"""

from herder.store.store import ClaimOutcome, Store, SubmittedJob

__all__ = ["ClaimOutcome", "Store", "SubmittedJob"]
