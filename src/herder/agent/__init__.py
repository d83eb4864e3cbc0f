"""The herder agent: the executor (sandbox, process group, outputs) and the daemon."""

from __future__ import annotations

from herder.agent.executor import (
    BlobCache,
    ExecResult,
    ExecSpec,
    Execution,
    Executor,
    StagingError,
)

__all__ = [
    "BlobCache",
    "ExecResult",
    "ExecSpec",
    "Execution",
    "Executor",
    "StagingError",
]
