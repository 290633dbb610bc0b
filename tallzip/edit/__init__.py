"""Editing an archive in place: add a task, remove a task (other sections copied byte for byte)."""
