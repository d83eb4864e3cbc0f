"""The herder agent: the executor (sandbox, process group, outputs) and the daemon."""

from __future__ import annotations

from herder.agent.daemon import Agent, AgentConfig, run_agent
from herder.agent.execspec import ExecResult, ExecSpec
from herder.agent.executor import BlobCache, Execution, Executor, StagingError

__all__ = [
    "Agent",
    "AgentConfig",
    "BlobCache",
    "ExecResult",
    "ExecSpec",
    "Execution",
    "Executor",
    "StagingError",
    "run_agent",
]
