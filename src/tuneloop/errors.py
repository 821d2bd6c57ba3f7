"""The one exception type for problems a user can fix (bad config, data or paths).

The CLI prints it as a single line and exits with status 2; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, phrased as: what is wrong, and how to fix it."""
