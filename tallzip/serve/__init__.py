"""Serving: a resident model that switches between an archive's tasks in place."""
