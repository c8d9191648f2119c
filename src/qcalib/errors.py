"""User-facing errors.

Anything a user can fix (a missing dataset, an unknown model name, bits out of range)
raises :class:`QCalibError` with a message that names the fix. The CLI prints such
errors as one line and exits with status 2; everything else is a bug and keeps its
traceback.
"""


class QCalibError(Exception):
    """An error caused by the user's input; the message says how to fix it."""
