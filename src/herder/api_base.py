"""The two base classes of every wire model (``herder.api_models``, ``herder.api_directory``).

Input models forbid unknown fields, so a typo is an error, never a silently
ignored setting; output models ignore what a newer master adds. Both build
their validators on first use (``defer_build``): start-up imports them all.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, defer_build=True)


class _Out(BaseModel):
    model_config = ConfigDict(extra="ignore", defer_build=True)
