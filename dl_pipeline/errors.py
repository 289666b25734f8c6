"""Error types that decide the process exit status.

`UserError` is a mistake the user can fix (bad config, missing file, wrong dataset for the
model): the CLI prints it as one line and exits 2, never with a traceback. Anything else is a
failure of the program or the cluster and exits 1.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in the user's input: message names the file/field/row and the fix."""

    exit_code = 2


class PipelineError(Exception):
    """An internal invariant broke (e.g. row accounting does not add up): exit 1."""

    exit_code = 1
