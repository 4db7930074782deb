"""The one exception type users see. The CLI prints its message on one line and exits non-zero;
library callers catch it like any other exception."""


class CnnkitError(Exception):
    """A problem the user can fix: the message says what went wrong and what to do."""


class TrainingInterrupted(CnnkitError):
    """Ctrl-C during training: the last good checkpoint is kept and the run can be resumed."""
