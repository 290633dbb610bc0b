"""Merging a family into one model (task arithmetic, TIES, consensus, average), from checkpoints or an archive."""
