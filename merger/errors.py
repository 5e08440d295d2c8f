"""Errors of the merger package, importable without torch (the CLI maps them to exit code 2)."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint directory, or a merge request over checkpoints, is unusable; the message says which and why."""
