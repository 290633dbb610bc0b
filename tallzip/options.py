"""The options of the verbs, and their checks, in one place.

What to store (merge method, mtv precision, codecs, zstandard level, chunk size) and how to run (memory
budget, workers, engine, device, progress callback) travel as small frozen dataclasses: `StoreOptions` and
`RunOptions`. Nothing here imports torch: the command line builds its choices from these names before it
loads any model code.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, fields, replace
from typing import Callable

from tallzip.errors import TallzipError
from tallzip.formats import codecs as codec_registry

MERGE_METHODS = ("sum", "ties")
MTV_DTYPES = ("float32", "bfloat16", "float16")
# bfloat16 by measurement: on the real-data benchmark (8, 14 and 20 tasks) the rebuilt tasks were exactly as
# accurate with a bfloat16 mtv as with float32, for 20-25% fewer archive bytes (benchmarks/RESULTS.md).
DEFAULT_MTV_DTYPE = "bfloat16"
LAMBDA_CANDIDATES = (0.2, 0.3, 0.4, 0.5, 0.6)
DEFAULT_LAMBDA = 0.4
DEFAULT_TIES_DENSITY = 0.2
# pack's data-free estimate of a tall task (ops/quality.py) on every k-th piece of each tensor (issue 21,
# benchmarks/RESULTS.md "Session 2: the estimate on a sample"); 1: every element
DEFAULT_ESTIMATE_EVERY = 8
# the methods of `merge` (tallzip/merging/merge.py), named here so the command line lists them without torch
MERGE_VERB_METHODS = ("task-arithmetic", "ties", "consensus-ta", "consensus-ties", "average")
ENGINES = ("local", "ray")
MAX_LEVEL = 22

# Measured side by side (benchmarks/RESULTS.md, "The default codecs and level"): byte planes beat plain
# zstandard by ~10% on float weights; zstandard level 1 is both smaller and faster than level 3 on
# byte planes; and at level 1, bit-packed masks + zstd give an archive within 0.2% of the context
# coders' at level 3 (ViT-B/32, N = 8) for half the pack CPU or less, where the context coders
# (bits-ctx, bits-lvl: ~10% fewer mask bits) cost 2-5x the CPU of all the rest at LLM sizes.
# Floats: blosc2+zstd (issue 21, benchmarks/codec_speed.py) is planes+zstd's byte shuffle and zstd
# done in C: 1.7-2.1x the decode and 1.1-1.3x the encode throughput per CPU-second, for +0.3-0.7% of
# the floats' bytes (+0.46% of an LLM-shaped N = 8 archive).
DEFAULT_CODECS = {"float": "blosc2+zstd", "mask": "bits+zstd", "other": "zstd"}
DEFAULT_LEVEL = 1

# Mask codecs code one bit per element. bits-ctx-prior also needs the earlier tasks' masks to
# decode (no random access), so it is for measuring only and pack does not offer it.
MASK_CODECS = ("bits+zstd", "bits-ctx", "bits-lvl")

# delta codes a tensor given the base: only exact tasks use it (representations.py)
FLOAT_CODECS = tuple(c for c in codec_registry.names() if c not in MASK_CODECS and c not in ("bits-ctx-prior", "delta"))


def checked_codecs(codecs: dict | None) -> dict:
    """DEFAULT_CODECS with the caller's choices for 'float', 'mask' and 'other' sections; refuses a
    codec that cannot code that kind of section."""
    chosen = {**DEFAULT_CODECS, **(codecs or {})}
    unknown = sorted(set(chosen) - set(DEFAULT_CODECS))
    if unknown:
        raise TallzipError(f"codecs: unknown section kind {unknown[0]!r} (expected float, mask or other)")
    for kind, allowed in (("float", FLOAT_CODECS), ("other", FLOAT_CODECS), ("mask", MASK_CODECS)):
        if chosen[kind] not in allowed:
            raise TallzipError(f"{kind} codec {chosen[kind]!r} is not one of {', '.join(allowed)}")
    return chosen




# Low-rank tasks (issue 22, benchmarks/RESULTS.md "Below two bits per weight"): energy 0.95 with 4-bit factors was
# the measured point keeping every task of the 20-task family >= 99% (99.91%, with the patch convolution q3); 0.92
# is 0.3 b/w smaller but let the least low-rank task fall to 98.3%. 1-d tensors q4.
LOWRANK_BITS = (2, 3, 4, 8)
# A tensor named by quant_tensors may instead take a q* task's own code by its name, q2 asymmetric (four levels, an
# offset per group) as `--keep q2`: the language family's token embedding kept >= 99.5% with it where the symmetric
# 2-bit code (three levels) lost 1.6% (RESULTS.md "Real language archives").
LOWRANK_QUANT_CODES = ("q8", "q4", "q3", "q2")
# The codecs a lowrank task's codes stream may be written with: planes+ans (an order-0 coder over the stream's one
# histogram, fast) or zstd at the archive's level, smaller at level 19 where the stream mixes code widths (the
# language family with the embedding and head q2/q3: -11.5%; benchmarks/RESULTS.md "Real language archives").
LOWRANK_CODES_CODECS = ("planes+ans", "zstd")


@dataclass(frozen=True)
class LowRankOptions:
    """How `lowrank` tasks are kept. energy: each matrix keeps the smallest rank whose singular values hold this
    fraction of ||tau||^2; factor_bits: its factors' codes (one bfloat16 scale per singular vector); fallback_bits:
    the q* code (groups of `group` along the matrix's rows) of 1-d tensors and of matrices whose rank would cost
    more; quant_tensors: ((fnmatch pattern, code), ...) tensors always kept as a q* code instead of factors (e.g.
    a patch convolution low rank keeps poorly): code bits b (symmetric, 2**b - 1 levels: 2 is ternary) or the name
    of a q* task's code (LOWRANK_QUANT_CODES: "q2" asymmetric with an offset per group, as --keep q2);
    task_energy: ((task, energy), ...) another energy for those tasks (one that evaluation showed needs more, or
    keeps its accuracy with less); seed: the randomized SVD's (matrices
    over memory_bytes as float64); codes_codec: the codec of the task's codes stream (LOWRANK_CODES_CODECS; zstd at
    the archive's level)."""
    energy: float = 0.95
    factor_bits: int = 4
    fallback_bits: int = 4
    group: int = 128
    quant_tensors: tuple = ()
    task_energy: tuple = ()
    seed: int = 0
    memory_bytes: int = 256 << 20
    codes_codec: str = "planes+ans"

    def __post_init__(self):
        pairs = [pair if isinstance(pair, (tuple, list)) and len(pair) == 2 else (None, None) for pair in self.task_energy]
        for energy in [self.energy, *(e for _, e in pairs)]:
            if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0.0 < energy <= 1.0:
                raise TallzipError(f"lowrank energy must be in (0, 1], got {energy!r} (task_energy: (task, energy) pairs)")
        object.__setattr__(self, "task_energy", tuple((str(t), float(e)) for t, e in pairs))
        codes = [pair[1] if isinstance(pair, (tuple, list)) and len(pair) == 2 else None for pair in self.quant_tensors]
        if any(b not in LOWRANK_BITS or type(b) is not int for b in (self.factor_bits, self.fallback_bits)) or \
                any(c not in LOWRANK_QUANT_CODES and (c not in LOWRANK_BITS or type(c) is not int) for c in codes):
            raise TallzipError(f"lowrank bits must be one of {LOWRANK_BITS} (quant_tensors: (pattern, code) pairs, "
                               f"code bits or one of {', '.join(LOWRANK_QUANT_CODES)})")
        if type(self.group) is not int or self.group < 1 or type(self.seed) is not int:
            raise TallzipError(f"lowrank group must be a whole number >= 1 and seed a whole number")
        if type(self.memory_bytes) is not int or self.memory_bytes < 1 << 16:
            raise TallzipError(f"lowrank memory_bytes must be a whole number >= 65536, got {self.memory_bytes!r}")
        object.__setattr__(self, "quant_tensors", tuple((str(p), c) for p, c in self.quant_tensors))
        if self.codes_codec not in LOWRANK_CODES_CODECS:
            raise TallzipError(f"lowrank codes_codec must be one of {', '.join(LOWRANK_CODES_CODECS)}, "
                               f"got {self.codes_codec!r}")

    def for_task(self, task: str) -> "LowRankOptions":
        """These options with the task's own energy, where task_energy gives one."""
        energy = dict(self.task_energy).get(task)
        return self if energy is None else replace(self, energy=energy, task_energy=())

    def tensor_code(self, name: str) -> int | str | None:
        """The q* code `name` is always kept as (quant_tensors: bits, or a q* task's code name), or None: factors
        when they pay."""
        from fnmatch import fnmatchcase
        return next((code for pattern, code in self.quant_tensors if fnmatchcase(name, pattern)), None)


@dataclass(frozen=True)
class StoreOptions:
    """What an archive stores; its bytes depend only on the inputs and these.

    lambdas: one number, {task: number} ('*' for the rest), or select_lambdas(evaluate). keep: how each
    task is kept: tall (default), q8, q4, q3, q2, q1, lowrank or exact for all, {task: rep} with '*' for the rest, or
    select_representation(evaluate, tolerance). merge: 'sum' or 'ties' (top-`density` trim, disjoint sum).
    mtv_dtype: the stored mtv's precision ('float32' is lossless). codecs: {'float', 'mask', 'other': codec}
    (missing keys take DEFAULT_CODECS; held here completed). level: zstandard's, 1..22. base_ref: store only
    the base's identity. allow_nonfinite: pack tensors holding NaN or Inf. chunk_elements: the chunk size
    the archive records (default 2^22). lowrank: how `lowrank` tasks are kept (LowRankOptions). estimate_every:
    tall tasks' data-free estimate summed on every k-th piece of each large tensor (1: all of it)."""
    lambdas: object = DEFAULT_LAMBDA
    keep: object = None
    merge: str = "sum"
    density: float = DEFAULT_TIES_DENSITY
    mtv_dtype: str = DEFAULT_MTV_DTYPE
    codecs: dict | None = None
    level: int = DEFAULT_LEVEL
    base_ref: bool = False
    allow_nonfinite: bool = False
    chunk_elements: int | None = None
    lowrank: LowRankOptions = LowRankOptions()
    estimate_every: int = DEFAULT_ESTIMATE_EVERY

    def __post_init__(self):
        checked(self)


@dataclass(frozen=True)
class RunOptions:
    """How a verb runs; never changes what it writes.

    memory: the budget for chunks in flight (bytes, or '1.5G', '256M'; None: the default). workers: threads
    (None: the CPUs). engine: 'local' (threads here), 'ray' (Ray tasks on the cluster at `address`: None
    starts a private one, 'auto' joins `ray start`'s, 'ray://HOST:PORT'), or an Engine (tallzip.run.engines).
    device: 'auto', 'cpu', 'cuda' or a torch.device. progress: callback(stage, done, total), or None."""
    memory: object = None
    workers: int | None = None
    engine: object = "local"
    address: str | None = None
    device: object = "auto"
    progress: Callable | None = None

    def __post_init__(self):
        checked(self)


def checked(options):
    """THE checks of the options (StoreOptions and RunOptions call it as they are made); completes
    StoreOptions.codecs. Returns `options`."""
    if isinstance(options, StoreOptions):
        if options.merge not in MERGE_METHODS:
            raise TallzipError(f"unknown merge {options.merge!r} (expected one of {', '.join(MERGE_METHODS)})")
        density = options.density
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
            raise TallzipError(f"density must be in (0, 1], got {density!r}")
        if options.mtv_dtype not in MTV_DTYPES:
            raise TallzipError(f"unknown mtv dtype {options.mtv_dtype!r} (expected one of {', '.join(MTV_DTYPES)})")
        object.__setattr__(options, "codecs", checked_codecs(options.codecs))
        if type(options.level) is not int or not 1 <= options.level <= MAX_LEVEL:
            raise TallzipError(f"level must be a whole number from 1 to {MAX_LEVEL}, got {options.level!r}")
        checked_chunk_elements(options.chunk_elements)
        if not isinstance(options.lowrank, LowRankOptions):
            raise TallzipError(f"lowrank must be a LowRankOptions, got {options.lowrank!r}")
        if type(options.estimate_every) is not int or options.estimate_every < 1:
            raise TallzipError(f"estimate_every must be a whole number >= 1, got {options.estimate_every!r}")
    elif isinstance(options, RunOptions):
        parse_memory(options.memory)
        workers = options.workers
        if workers is not None and (type(workers) is not int or workers < 1):
            raise TallzipError(f"workers must be a whole number >= 1, got {workers!r}")
        if isinstance(options.engine, str) and options.engine not in ENGINES:
            raise TallzipError(f"unknown engine {options.engine!r} (choose from {', '.join(ENGINES)})")
        if options.progress is not None and not callable(options.progress):
            raise TallzipError(f"progress must be a callable (stage, done, total), got {options.progress!r}")
    return options


def checked_chunk_elements(value):
    from tallzip.run.chunks import checked_chunk_elements as check  # its module loads torch: not at `tallzip --help`
    return check(value)


def parse_memory(value):
    from tallzip.run.chunks import parse_memory as parse  # as above
    return parse(value)


STORE_FIELDS = tuple(f.name for f in fields(StoreOptions))
RUN_FIELDS = tuple(f.name for f in fields(RunOptions))


def from_keywords(verb: str, store: StoreOptions | None, run: RunOptions | None, keywords: dict,
                  store_fields=STORE_FIELDS, run_fields=RUN_FIELDS, stacklevel: int = 3):
    """(store, run) with the keyword arguments of the older API (lambdas=..., memory=...) folded in, with
    a DeprecationWarning: they go in the next release. A keyword that is neither is a TypeError, as Python's."""
    store = StoreOptions() if store is None else store
    run = RunOptions() if run is None else run
    if not keywords:
        return store, run
    unknown = sorted(set(keywords) - set(store_fields) - set(run_fields))
    if unknown:
        raise TypeError(f"{verb}() got an unexpected keyword argument {unknown[0]!r}")
    instead = " and ".join((["store=StoreOptions(...)"] if store_fields else []) + ["run=RunOptions(...)"])
    warnings.warn(f"{verb}(): the keyword arguments {', '.join(sorted(keywords))} are deprecated and go in the next "
                  f"release; pass {instead} (tallzip.options)", DeprecationWarning, stacklevel=stacklevel)
    store_kw = {k: v for k, v in keywords.items() if k in store_fields}
    run_kw = {k: v for k, v in keywords.items() if k in run_fields}
    return (replace(store, **store_kw) if store_kw else store), (replace(run, **run_kw) if run_kw else run)
