"""The chunk plan of format version 2: which element ranges of a tensor are coded as one chunk.

The plan depends only on the tensor's shape and the archive's `chunk_elements`, never on the
machine or the memory budget, so any writer (one process, or many workers each coding some
chunks) cuts a tensor the same way and writes byte-identical archives.
"""
from __future__ import annotations

import math

import numpy as np


def chunk_step(shape, chunk_elements: int) -> int:
    """Elements per chunk (the last may be shorter): whole rows when a row fits in a chunk."""
    count = math.prod(shape)
    if count <= chunk_elements:
        return max(count, 1)
    row = math.prod(shape[1:]) if len(shape) >= 2 else 1
    if 0 < row <= chunk_elements:
        return (chunk_elements // row) * row
    return chunk_elements


def chunk_count(shape, chunk_elements: int) -> int:
    """len(chunk_plan(...)), without building it (a reader checks a manifest's chunk lists with it)."""
    count = math.prod(shape)
    step = chunk_step(shape, chunk_elements)
    return 1 if count <= step else -(-count // step)


def chunk_plan(shape, chunk_elements: int) -> list[tuple[int, int]]:
    """[(start, count)] over the flattened tensor (C order). A tensor of at most chunk_elements
    elements, a 0-d tensor and an empty one are one chunk ((0, 0) for an empty tensor)."""
    count = math.prod(shape)
    step = chunk_step(shape, chunk_elements)
    if count <= step:
        return [(0, count)]
    return [(start, min(step, count - start)) for start in range(0, count, step)]


def chunk_shape(shape, start: int, count: int) -> tuple:
    """The shape a chunk is seen with by context codecs: its rows when it holds whole rows, else flat."""
    shape = tuple(shape)
    if count == math.prod(shape):
        return shape
    row = math.prod(shape[1:]) if len(shape) >= 2 else 1
    if len(shape) >= 2 and row and start % row == 0 and count % row == 0:
        return (count // row, *shape[1:])
    return (count,)


def mask_context(mtv_bits: np.ndarray, dtype: str, shape) -> dict:
    """The side information a mask chunk is coded with (SPEC.md), the same for writer and reader:
    "mtv": the chunk's stored mtv as float32 (BF16 and F16 widened exactly, F64 rounded), flat;
    "shape": the chunk's shape; and, for codecs that want the stored values themselves,
    "mtv_bits" (the stored bits, as read) and "mtv_dtype" (their dtype name)."""
    bits = np.ascontiguousarray(mtv_bits).reshape(-1)
    if dtype == "BF16":
        values = (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
    elif dtype == "F16":
        values = bits.view(np.float16).astype(np.float32)
    elif dtype == "F64":
        values = bits.view(np.float64).astype(np.float32)
    else:
        values = bits.view(np.float32)
    return {"mtv": values, "shape": tuple(shape), "mtv_bits": bits, "mtv_dtype": dtype}
