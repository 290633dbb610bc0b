"""The archive container: header, manifest, sections and chunks (reader, writer, manifest blob, chunk
plan, constants, the quantized group layout). formats/SPEC.md says the same in prose."""
