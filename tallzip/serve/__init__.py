"""Serving: a resident model that switches between an archive's tasks in place, and a task built as a
transformers model straight from the archive (hf.py)."""
