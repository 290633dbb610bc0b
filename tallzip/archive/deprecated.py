"""Archive's deprecated extract aliases (they go in the next release), kept apart from the reading code."""
from __future__ import annotations

import warnings
from pathlib import Path


def _deprecated(old: str, new: str):
    warnings.warn(f"{old} is deprecated and goes in the next release: use {new}", DeprecationWarning, stacklevel=3)


class DeprecatedAliases:
    """Mixed into Archive: the older names of `extract`."""

    def extract_with_report(self, task: str, output, *, fmt=None, force=False, device="cpu", progress=None):
        """Deprecated alias of `extract` (which now returns the report); goes in the next release."""
        _deprecated("Archive.extract_with_report", "Archive.extract")
        return self.extract(task, output, fmt=fmt, force=force, device=device, progress=progress)

    def extract_all(self, folder, *, fmt: str | None = None, force: bool = False, device="cpu",
                    progress=None) -> list[Path]:
        """Deprecated: `extract(None, folder).paths`; goes in the next release."""
        _deprecated("Archive.extract_all", "Archive.extract(None, folder)")
        return self.extract(None, folder, fmt=fmt, force=force, device=device, progress=progress).paths

    def extract_all_with_report(self, folder, *, fmt=None, force=False, device="cpu", progress=None):
        """Deprecated alias of `extract(None, folder)`; goes in the next release."""
        _deprecated("Archive.extract_all_with_report", "Archive.extract(None, folder)")
        return self.extract(None, folder, fmt=fmt, force=force, device=device, progress=progress)
