"""herder: a distributed job farm."""

__version__ = "0.1.0"
