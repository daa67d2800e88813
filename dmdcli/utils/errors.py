"""The one error type for user mistakes: the CLI prints its message as one line, exit code 2."""


class UserError(Exception):
    """A mistake the user can fix (bad recipe, missing file, ...). The message names the
    bad thing and the fix; no traceback is shown."""
