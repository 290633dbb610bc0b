"""Deprecated alias of tallzip.verify.info (this name shadowed the standard library's `inspect`); it goes in the
next release. Use `tallzip.verify`, `tallzip.info` and `tallzip.agreement`."""
import warnings

from tallzip.verification.info import LOSSLESS_CODECS, agreement, layer_kind, recorded_level, summary  # noqa: F401
from tallzip.verification.verify import verify  # noqa: F401

warnings.warn("tallzip.inspect is deprecated: use tallzip.verify / tallzip.info / tallzip.agreement",
              DeprecationWarning, stacklevel=2)
