"""Checking an archive: verify (checksums, decoding, agreement with the inputs), info and the agreement
between tasks' masks."""
