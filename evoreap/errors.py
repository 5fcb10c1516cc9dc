"""Errors that the CLI turns into one line and an exit code (usage: 2, runtime: 1)."""


class EvoreapError(Exception):
    """Something went wrong at run time; the message says what and what to do. CLI exit code 1."""

    exit_code = 1


class UsageError(EvoreapError):
    """The command line or an input file is wrong. CLI exit code 2."""

    exit_code = 2


class UnsupportedModelError(EvoreapError):
    """The model is not a routed MoE evoreap knows."""
