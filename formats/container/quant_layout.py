"""Where a quantized task's scales lie: one group of scales per chunk of the tensor's plan. Layout only.

A q* task's tensor is quantized chunk by chunk (formats/chunking.py): each chunk of the plan, seen with
its chunk shape (whole rows of the tensor, or flat when a row is longer than a chunk), is cut into rows
of its last dimension and each row into groups of `group` elements (the last one shorter; `None`: the
whole row). Chunk k has rows_k * G_k scales, G_k = ceil(cols_k / group); the `qscales` section is those
scales, chunk after chunk, and its chunk k is exactly chunk k's scales. So a codes chunk and its scales
chunk decode alone, and the plan of the scales follows from the tensor's shape, C and the group.
"""
from __future__ import annotations

import math

import numpy as np

from tallzip.formats.container.chunking import chunk_plan, chunk_shape


def quant_rows(shape, group: int | None) -> tuple[int, int, int, int]:
    """(rows, cols, group size, groups per row) of a tensor or chunk seen with `shape`: rows are the last
    dimension, groups never cross them; `group` None means one group (one scale) per row."""
    shape = tuple(shape)
    cols = shape[-1] if shape else 1
    rows = math.prod(shape[:-1]) if shape else 1
    size = cols if group is None else group
    groups = -(-cols // size) if size else 0
    return rows, cols, max(size, 1), groups


def group_lengths(shape, group: int | None) -> np.ndarray:
    """The length of every group of a tensor or chunk seen with `shape`, row after row (int64): `group`
    elements each, the last of a row shorter when `group` does not divide the row."""
    rows, cols, size, groups = quant_rows(shape, group)
    if not groups:
        return np.zeros(0, dtype=np.int64)
    row = np.full(groups, size, dtype=np.int64)
    row[-1] = cols - size * (groups - 1)
    return np.tile(row, rows)


def scales_plan(shape, chunk_elements: int, group: int | None) -> list[tuple[int, int, tuple]]:
    """[(start, count, (rows, groups))] of the qscales section of a tensor of `shape`: one per chunk."""
    out, start = [], 0
    for c_start, c_count in chunk_plan(shape, chunk_elements):
        rows, _, _, groups = quant_rows(chunk_shape(shape, c_start, c_count), group)
        if c_count == 0:
            rows, groups = 0, 0
        out.append((start, rows * groups, (rows, groups)))
        start += rows * groups
    return out


def scales_count(shape, chunk_elements: int, group: int | None) -> int:
    plan = scales_plan(shape, chunk_elements, group)
    return plan[-1][0] + plan[-1][1] if plan else 0
