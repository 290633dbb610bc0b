"""Errors raised by the formats package: each message is one line meant for the user."""


class FormatError(ValueError):
    """An input file or archive that cannot be read as asked."""


class CorruptArchiveError(FormatError):
    """The archive's bytes do not match what its manifest promises."""


class UnsupportedVersionError(FormatError):
    """An archive written by another format version."""


def one_line(error: BaseException, *, with_type: bool = False, limit: int = 300) -> str:
    """An exception as one line for the user: its message's first line (at most `limit` characters),
    with its type in front if `with_type` (or instead of an empty message)."""
    lines = str(error).strip().splitlines()
    text = lines[0][:limit] if lines else ""
    if with_type:
        return f"{type(error).__name__}: {text}"
    return text or type(error).__name__
