"""Errors raised by the formats package: each message is one line meant for the user."""


class FormatError(ValueError):
    """An input file or archive that cannot be read as asked."""


class CorruptArchiveError(FormatError):
    """The archive's bytes do not match what its manifest promises."""


class UnsupportedVersionError(FormatError):
    """An archive written by another format version."""
