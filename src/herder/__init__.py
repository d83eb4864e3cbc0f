"""herder: a distributed job farm.

``from herder import Client`` is the Python API (:mod:`herder.pyapi`). It is
imported on first use: ``import herder`` stays cheap for the CLI and agents.
"""

from __future__ import annotations

__version__ = "0.1.0"

TYPE_CHECKING = False  # not typing's: importing typing costs ~10 ms at start-up
if TYPE_CHECKING:
    from herder.pyapi import Client

__all__ = ["Client", "__version__"]


def __getattr__(name: str) -> object:
    if name == "Client":
        from herder.pyapi import Client

        return Client
    raise AttributeError(f"module 'herder' has no attribute {name!r}")
