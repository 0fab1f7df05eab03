"""The one exception type for mistakes in what a user gave us.

Anything a user can fix (a bad file, an unknown name, a budget too small) raises `UserError` with one line
that says what is wrong and what to do. The CLI prints that line to stderr and exits with code 2; every
other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem in user input, reported as one line and exit code 2."""
