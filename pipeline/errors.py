"""The one error family and the exit codes of the run contract.

Every expected failure raises a `PipelineError` (or a subclass) whose message is one line naming the
bad input and the fix; `pipeline.cli.main` prints it as `error: <message>` and exits with the error's
`exit_code`. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

EXIT_FINISHED = 0
EXIT_FAILURE = 1  # a real failure: the run cannot go on (dead peer, non-finite loss, ...)
EXIT_BAD_INPUT = 2  # bad config, path, data or checkpoint: fix the input and run again
EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped on a signal after saving; run the same command again to resume


class PipelineError(Exception):
    """An expected failure with a one-line message; `exit_code` tells the launcher what happened."""

    exit_code = EXIT_FAILURE


class InputError(PipelineError):
    """Bad input: a config value, a path, a shard, a weights file. Nothing already written is lost."""

    exit_code = EXIT_BAD_INPUT
