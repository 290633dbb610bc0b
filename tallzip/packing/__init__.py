"""Writing an archive: the pack plan, the chunk jobs, lambda selection and representation choice."""
