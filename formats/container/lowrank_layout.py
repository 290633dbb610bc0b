"""Where a low-rank task's tensors lie in its two streams (SPEC.md, "lowrank"). Layout only, no math.

A task kept as `lowrank` lists its tensors in its manifest entry, `"lowrank": {"tensors": [[name, rank,
bits, rel_error(, grid)], ...]}`; each tensor is seen as its matrix (m, n) = (d0, d1*...*dk) (a 1-d tensor: (1, d0),
a 0-d one (1, 1)). Its codes and scales are laid end to end in the task's `lrcodes` and `lrscales` sections,
in the listed order:
* rank r > 0: r*m codes of L (its rows), then r*n of R; 2r scales (L's r rows, then R's);
* rank 0: the m*n codes of the q{bits} code of the matrix (row-major, the tensor's own flat order); m*G
  scales, G = ceil(n / group); on the asymmetric grid (a record's fifth field, as a `q2` task's codes) m*G
  offsets after them.
"""
from __future__ import annotations

import math

from tallzip.formats.container.constants import SCALE_DTYPES

LOWRANK_BITS = (2, 3, 4, 8)  # factor and fallback bits a reader accepts
SYMMETRIC, ASYMMETRIC = "symmetric", "asymmetric"  # the grid of a rank-0 code (a record without one: symmetric)
ASYMMETRIC_BITS = (2, 3, 4)  # codes 0..2^b - 1 lie in the I8 codes stream


def record_grid(record) -> str:
    """The grid of a record [name, rank, bits, rel_error(, grid)]: its fifth field, symmetric when absent."""
    return record[4] if len(record) == 5 else SYMMETRIC


def stored_matrix(shape) -> tuple[int, int]:
    """(m, n): a tensor of two or more dimensions as (d0, d1*...), a 1-d one as one row, a 0-d one as (1, 1)."""
    shape = tuple(shape)
    if len(shape) >= 2:
        return shape[0], math.prod(shape[1:])
    return 1, (shape[0] if shape else 1)


def counts(shape, rank: int, group: int, grid: str = SYMMETRIC) -> tuple[int, int]:
    """(codes, scales) one tensor takes in the streams (an asymmetric code's offsets count as scales)."""
    m, n = stored_matrix(shape)
    if rank:
        return rank * (m + n), 2 * rank
    return m * n, m * -(-n // group) * (2 if grid == ASYMMETRIC else 1)


def stream_spans(records, shapes: dict, group: int) -> dict:
    """name -> (codes start, codes count, scales start, scales count), in the listed order. records:
    [[name, rank, bits, rel_error(, grid)], ...]; shapes: name -> the tensor's shape."""
    spans, codes, scales = {}, 0, 0
    for record in records:
        name, rank = record[0], record[1]
        c, s = counts(shapes[name], rank, group, record_grid(record))
        spans[name] = (codes, c, scales, s)
        codes, scales = codes + c, scales + s
    return spans


def stream_totals(records, shapes: dict, group: int) -> tuple[int, int]:
    spans = stream_spans(records, shapes, group)
    return (sum(c for _, c, _, _ in spans.values()), sum(s for _, _, _, s in spans.values()))


def lowrank_params_problem(params, shapes: dict) -> str | None:
    """Why a task entry's "lowrank" field cannot be decoded (None when it can): its keys and types, every
    tensor named once and known (shapes: the archive's tensor shapes), a rank no larger than min(m, n), bits
    a reader decodes, a known grid (asymmetric only for a rank-0 code of ASYMMETRIC_BITS)."""
    if not isinstance(params, dict):
        return "no lowrank parameters"
    group, records = params.get("group"), params.get("tensors")
    if type(group) is not int or group < 1 or params.get("scale_dtype") not in SCALE_DTYPES:
        return "bad lowrank group or scale dtype"
    if not isinstance(records, list):
        return "no lowrank tensor list"
    seen = set()
    for record in records:
        if not (isinstance(record, list) and len(record) in (4, 5) and isinstance(record[0], str)
                and type(record[1]) is int and record[1] >= 0 and record[2] in LOWRANK_BITS
                and type(record[2]) is int and type(record[3]) in (int, float) and math.isfinite(record[3])
                and record[3] >= 0):
            return f"bad lowrank tensor record {str(record)[:60]}"
        name, rank, grid = record[0], record[1], record_grid(record)
        if grid not in (SYMMETRIC, ASYMMETRIC):
            return f"lowrank tensor {name!r}: unknown grid {str(grid)[:30]!r}"
        if grid == ASYMMETRIC and (rank or record[2] not in ASYMMETRIC_BITS):
            return f"lowrank tensor {name!r}: an asymmetric grid needs rank 0 and bits 2, 3 or 4"
        if name in seen or name not in shapes:
            return f"lowrank tensor {name!r} repeated or not in the archive"
        seen.add(name)
        m, n = stored_matrix(shapes[name])
        if rank > min(m, n) or (rank and len(shapes[name]) < 2):
            return f"lowrank tensor {name!r}: rank {rank} does not fit its shape {list(shapes[name])}"
    return None
