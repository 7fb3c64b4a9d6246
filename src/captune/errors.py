"""The exceptions for what a user can fix, and the exit status the CLI gives each."""


class CaptuneError(Exception):
    """Bad input or configuration: the message names the file, line, field or value and says what to do.

    The CLI prints the message on one line without a traceback and exits with `exit_code`.
    """

    exit_code = 2
    """2: bad input (as argparse's usage errors); 1 is kept for "problems found" (`data check`, failed images)."""


class TrainingDiverged(CaptuneError):
    """Training stopped because its loss or gradients became NaN or infinite; the checkpoints before are kept."""

    exit_code = 3
