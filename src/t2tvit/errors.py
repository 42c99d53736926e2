"""Errors a user can fix. The CLI prints them as one line and exits with status 2, no traceback."""


class UserError(Exception):
    """A mistake in the user's input (a path, a name, a flag): the message names the problem and the fix."""

    exit_code = 2
