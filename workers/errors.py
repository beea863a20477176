"""The one family of prunetune's errors: each says in one line what went wrong, and its branch gives the exit status.

`BadInput` (exit 2): something the user gave (config, data, model, checkpoint, cache, run directory) cannot be
used; it is raised before anything is lost. `RunFailed` (exit 1): a run that started could not produce its result
(every candidate failed, training diverged, the disk filled up). The command line maps by branch, never by class.
"""
from __future__ import annotations


class PrunetuneError(Exception):
    """Any error prunetune reports in one line; `exit_code` is the command's exit status for it."""

    exit_code = 1


class BadInput(PrunetuneError):
    """A value the user gave cannot be used; the message names the field and what is allowed."""

    exit_code = 2


class RunFailed(PrunetuneError):
    """A run could not produce its result; the message says why and, where it can, how to continue."""

    exit_code = 1
