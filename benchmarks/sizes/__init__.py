"""The sizes suite: what an archive stores and how small, against the paper's layout (storage.py), the codecs
on whole tensors against zstandard and zipnn (codecs.py) and by format-v2 chunk (chunks.py).
Run: python -m benchmarks.sizes {storage,codecs,chunks} --help."""
