"""Checkpoints in and out: safetensors and torch files (zip, lazy, safe unpickling), sources and URLs,
atomic outputs."""
