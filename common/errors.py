"""The one exception type for mistakes a user can fix (paths, configs, corpora, checkpoints, models).

The CLI prints its message as a single line and exits nonzero; everything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """An input the user got wrong; the message says what to change."""
