"""The one exception type for input a user can fix."""


class CaptuneError(Exception):
    """Bad input or configuration: the message names the file, line, field or value and says what to do.

    The CLI prints the message without a traceback and exits with status 2.
    """
