"""The one exception type users see."""


class PTQError(Exception):
    """A problem the user can fix: the message names it and says how.

    The CLI prints it without a traceback; the Slicer module shows it in a
    message box.
    """
