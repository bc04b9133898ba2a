"""One exception type for everything a user can get wrong, so every door can show a short message."""


class LiverSegError(Exception):
    """A user-facing error: the message names the file or setting and the reason, no traceback needed."""


class UsageError(LiverSegError):
    """Wrong options, or what makes a whole run wrong before any case (a model that cannot be loaded): every
    door exits 2 for it."""


class CancelledError(LiverSegError):
    """Raised when the caller's cancel callback asks the run to stop."""

    def __init__(self, message: str = "cancelled by the user") -> None:
        super().__init__(message)


class OutputExistsError(LiverSegError):
    """The output file exists (perhaps written meanwhile by a concurrent run) and was not replaced."""
