"""Bytes and files, no model math: the codecs, the archive container (reader, writer, manifest, chunk
plan, constants; formats/SPEC.md describes it) and the checkpoint readers and writers."""
