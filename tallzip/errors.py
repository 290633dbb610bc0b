"""Errors the library raises for the user: each message is one line."""


class TallzipError(Exception):
    """Bad input or a request that cannot be met (the CLI prints it and exits non-zero)."""


class TaskMismatchError(TallzipError):
    """A task's checkpoint does not fit the base (missing tensor, other shape)."""


class UnknownTaskError(TallzipError, KeyError):
    def __str__(self):  # KeyError would quote the message
        return self.args[0]


class MissingExtraError(TallzipError):
    """An optional dependency that the request needs is not installed (the message names the extra)."""
