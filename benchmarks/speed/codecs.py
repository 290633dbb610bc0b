"""Float codecs side by side on real chunks of two generated families (issue 21): size / raw and
encode / decode GB/s on one thread and on two.

    python -m benchmarks.speed codecs --cache C              # both families (benchmarks.fixtures presets)
    python -m benchmarks.speed codecs --cache C --family llm --repeats 5 --chunks 4
    python -m benchmarks.speed codecs --base B --task-dir T  # any family already on disk

Chunks are what format v2 codes: whole rows of a tensor, up to 2^22 elements, read from the
families benchmarks.speed generates (and reuses) under --cache: the ViT-B/32-shaped float32 one
(tallzip.demo) and the LLM-shaped bfloat16 one (benchmarks.llm_family, preset small). Per family two
kinds of chunk, as a tall archive stores them: the base in its own dtype, and the sum of the N task
vectors rounded to bfloat16 (tallzip's default mtv dtype). Every codec sees the same chunks as
unsigned-integer views of their bits (how tallzip's registry hands floats to codecs).

Timing: every repeat runs every codec once, one after the other (the machine is shared and noisy,
so codecs are compared inside a repeat, not across runs); the median over repeats is shown. "1
thread": the chunks coded one after the other, each codec told to use one thread. "2 threads": the
same chunks handed to a pool of two Python threads, as tallzip's chunk pool does (each codec call
still single-threaded): it shows whether a codec leaves the GIL while it works. GB/s are of raw
(decoded) bytes per wall second (the 2-thread figure: both threads together) and, as the figure that
other work on a shared machine disturbs least, per CPU-second of this process. Every decode is
compared with the original bits.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

CHUNK = 1 << 22


# --- the chunks ------------------------------------------------------------------------------

def _bits(tensor: torch.Tensor) -> np.ndarray:
    """A float tensor's bits as a flat unsigned numpy array (bfloat16 -> uint16)."""
    signed = {2: torch.int16, 4: torch.int32}[tensor.element_size()]
    return tensor.contiguous().view(signed).numpy().view(f"u{tensor.element_size()}").reshape(-1).copy()


def _row_chunks(shape) -> list[tuple[int, int]]:
    """(start, count) of whole-row chunks of up to CHUNK elements."""
    row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    rows = max(1, CHUNK // row)
    total = int(np.prod(shape))
    return [(s, min(rows * row, total - s)) for s in range(0, total, rows * row)]


def family_chunks(base_path: Path, task_paths: list[Path], n_chunks: int) -> dict[str, list[np.ndarray]]:
    """{"base <dtype>": [bits], "mtv bf16": [bits]}: n_chunks chunks taken evenly from the largest
    matrices (and the mtv of the same chunks: sum of task vectors in float32, rounded to bf16)."""
    from tallzip.formats.checkpoints.checkpoint import open_checkpoint
    base = open_checkpoint(base_path)
    tasks = [open_checkpoint(p) for p in task_paths]
    matrices = sorted((n for n in base.names if len(base.shapes[n]) == 2),
                      key=lambda n: -int(np.prod(base.shapes[n])))
    chunks = [(n, s, c) for n in matrices for s, c in _row_chunks(base.shapes[n])]
    candidates = [x for x in chunks if x[2] >= CHUNK // 4] or chunks  # small test families: whatever there is
    picked = [candidates[i] for i in np.linspace(0, len(candidates) - 1, n_chunks).round().astype(int)]
    out = {}
    for name, start, count in picked:
        b = base.read_range(name, start, count)
        mtv = torch.zeros(count, dtype=torch.float32)
        for t in tasks:
            mtv += t.read_range(name, start, count).float() - b.float()
        out.setdefault(f"base {str(b.dtype).replace('torch.', '').replace('bfloat16', 'bf16').replace('float32', 'fp32')}",
                       []).append(_bits(b))
        out.setdefault("mtv bf16", []).append(_bits(mtv.to(torch.bfloat16)))
    return out


# --- the codecs ------------------------------------------------------------------------------
#
# Each candidate: encode(bits) -> payload, decode(payload, bits_dtype, count) -> bits array.

class TallzipCodec:
    def __init__(self, name, level):
        from tallzip.formats import codecs
        self.codecs, self.codec, self.level = codecs, name, level
        self.label = f"tallzip {name} L{level}" if name != "planes+ans" else f"tallzip {name}"

    def encode(self, bits):
        data, params = self.codecs.encode(self.codec, bits, level=self.level)
        return data, params

    def decode(self, payload, dtype, count):
        data, params = payload
        return self.codecs.decode(self.codec, data, dtype=dtype, count=count, params=params)

    @staticmethod
    def size(payload):
        return len(payload[0])


ROTATE_BLOCK = 1 << 16


def _rotate_blocks(bits, left: bool):
    """In place, by cache-sized blocks: the sign bit moved from the top to bit 0 (left) or back."""
    one, top = bits.dtype.type(1), bits.dtype.type(bits.dtype.itemsize * 8 - 1)
    first, second = (one, top) if left else (top, one)
    a, b = np.empty(ROTATE_BLOCK, bits.dtype), np.empty(ROTATE_BLOCK, bits.dtype)
    for start in range(0, bits.size, ROTATE_BLOCK):
        block = bits[start:start + ROTATE_BLOCK]
        n = block.size
        (np.left_shift if left else np.right_shift)(block, one, out=a[:n])
        (np.right_shift if left else np.left_shift)(block, top, out=b[:n])
        np.bitwise_or(a[:n], b[:n], out=block)
    return bits


def rotate_sign(bits):
    """The sign bit moved from the top to bit 0 (as tallzip's byte planes do), a new array."""
    return _rotate_blocks(bits.copy(), True)


def unrotate_sign(bits):
    return _rotate_blocks(bits, False)


class Blosc2Codec:
    def __init__(self, filt, codec, level, blocksize=0, rotate=False):
        import blosc2
        self.blosc2 = blosc2
        self.filt, self.codec, self.level, self.blocksize, self.rotate = filt, codec, level, blocksize, rotate
        block = f" block {blocksize >> 10}K" if blocksize else ""
        self.label = (f"blosc2 {'rot+' if rotate else ''}{filt.name} {codec.name}"
                      f"{'' if codec == blosc2.Codec.LZ4 else ' L' + str(level)}{block}")

    def encode(self, bits):
        if self.rotate:
            bits = rotate_sign(bits)
        return self.blosc2.compress2(bits, typesize=bits.dtype.itemsize, clevel=self.level, filters=[self.filt],
                                     filters_meta=[0], codec=self.codec, nthreads=1, blocksize=self.blocksize,
                                     splitmode=self.blosc2.SplitMode.ALWAYS_SPLIT)

    def decode(self, payload, dtype, count):
        out = np.empty(count, dtype=dtype)
        self.blosc2.decompress2(payload, dst=out, nthreads=1)
        return unrotate_sign(out) if self.rotate else out

    @staticmethod
    def size(payload):
        return len(payload)


class ZipnnCodec:
    def __init__(self, reorder_signbit=0):
        from zipnn import ZipNN
        self.make = lambda dtype: ZipNN(input_format="byte", bytearray_dtype=dtype, threads=1,
                                        reorder_signbit=reorder_signbit)
        self.label = "zipnn 0.5.4" + (" signbit" if reorder_signbit else "")
        self.coders = {}

    def coder(self, itemsize):
        if itemsize not in self.coders:
            self.coders[itemsize] = self.make({2: "bfloat16", 4: "float32"}[itemsize])
        return self.coders[itemsize]

    def encode(self, bits):
        return bytes(self.coder(bits.dtype.itemsize).compress(bits.tobytes()))

    def decode(self, payload, dtype, count):
        return np.frombuffer(self.coder(dtype.itemsize).decompress(payload), dtype=dtype)

    @staticmethod
    def size(payload):
        return len(payload)


def candidates(names: set[str] | None, with_ans: bool) -> list:
    import blosc2
    F, C = blosc2.Filter, blosc2.Codec
    out = [TallzipCodec("planes+zstd", 1), TallzipCodec("planes+zstd", 3)]
    if with_ans:
        out.append(TallzipCodec("planes+ans", 1))
    out += [TallzipCodec("blosc2+zstd", 1), TallzipCodec("blosc2+zstd", 3)]
    out += [Blosc2Codec(F.SHUFFLE, C.ZSTD, 1), Blosc2Codec(F.SHUFFLE, C.ZSTD, 3),
            Blosc2Codec(F.SHUFFLE, C.ZSTD, 1, blocksize=1 << 20), Blosc2Codec(F.SHUFFLE, C.ZSTD, 1, blocksize=4 << 20),
            Blosc2Codec(F.SHUFFLE, C.ZSTD, 1, blocksize=4 << 20, rotate=True),
            Blosc2Codec(F.BITSHUFFLE, C.ZSTD, 1), Blosc2Codec(F.SHUFFLE, C.LZ4, 1), Blosc2Codec(F.BITSHUFFLE, C.LZ4, 1)]
    try:
        out += [ZipnnCodec()]
    except ImportError:
        print("zipnn: not installed here, left out", file=sys.stderr)
    return [c for c in out if names is None or c.label in names]


# --- timing ----------------------------------------------------------------------------------

def _timed(fn, items, threads, pool):
    """(wall seconds, CPU seconds of the working threads)."""
    cpu, start = time.process_time(), time.perf_counter()  # process: zipnn works on threads of its own
    if threads == 1:
        for x in items:
            fn(x)
        return time.perf_counter() - start, time.process_time() - cpu
    list(pool.map(fn, items))
    return time.perf_counter() - start, time.process_time() - cpu


def measure(chunks: dict[str, list[np.ndarray]], codecs: list, repeats: int) -> list[dict]:
    keys = ("enc1", "dec1", "enc2", "dec2", "enc1_cpu", "dec1_cpu", "enc2_cpu", "dec2_cpu")
    rows = {(kind, c.label): {"kind": kind, "codec": c.label, **{k: [] for k in keys}} for kind in chunks for c in codecs}
    pool = ThreadPoolExecutor(2)
    for kind, bits in chunks.items():
        raw = sum(b.nbytes for b in bits)
        for c in codecs:
            payloads = [c.encode(b) for b in bits]
            for b, p in zip(bits, payloads):
                if not np.array_equal(c.decode(p, b.dtype, b.size), b):
                    raise SystemExit(f"{c.label}: {kind} did not round-trip")
            rows[kind, c.label].update(raw=raw, size=sum(c.size(p) for p in payloads) / raw, payloads=payloads)
        for _ in range(repeats):
            for c in codecs:
                row = rows[kind, c.label]
                payloads = row["payloads"]
                work = list(zip(payloads, bits))
                for threads in (1, 2):
                    wall, cpu = _timed(c.encode, bits, threads, pool)
                    row[f"enc{threads}"].append(raw / wall / 1e9)
                    row[f"enc{threads}_cpu"].append(raw / cpu / 1e9)
                    wall, cpu = _timed(lambda pb: c.decode(pb[0], pb[1].dtype, pb[1].size), work, threads, pool)
                    row[f"dec{threads}"].append(raw / wall / 1e9)
                    row[f"dec{threads}_cpu"].append(raw / cpu / 1e9)
    pool.shutdown()
    out = []
    for row in rows.values():
        row.pop("payloads", None)
        for key in keys:
            row[key + "_runs"] = row[key]
            row[key] = statistics.median(row[key])
        out.append(row)
    return out


def report(rows, family_note):
    print(family_note)
    print("  GB/s of raw bytes per wall second (2t: both threads together) and, in brackets, per CPU-second")
    print(f"  {'chunks':9} {'codec':40} {'size/raw':>8} | {'encode 1 thread':>15} {'2 threads':>13} | "
          f"{'decode 1 thread':>15} {'2 threads':>13}")
    for r in rows:
        print(f"  {r['kind']:9} {r['codec']:40} {r['size']:8.4f} | {r['enc1']:6.3f} ({r['enc1_cpu']:5.3f}) "
              f"{r['enc2']:6.3f} ({r['enc2_cpu']:4.2f}) | {r['dec1']:6.3f} ({r['dec1_cpu']:5.3f}) "
              f"{r['dec2']:6.3f} ({r['dec2_cpu']:4.2f})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, help="where benchmarks.fixtures keeps (or generates) the families")
    parser.add_argument("--family", nargs="+", choices=["vit", "llm"], default=["vit", "llm"],
                        help="fixture presets vit-b32 (fp32) and llm-small (bf16)")
    parser.add_argument("--base", type=Path, help="instead of --cache: a base checkpoint on disk ...")
    parser.add_argument("--task-dir", type=Path, help="... and the folder of its task checkpoints")
    parser.add_argument("--tasks", type=int, default=8, help="N: tasks summed into the mtv")
    parser.add_argument("--chunks", type=int, default=4, help="chunks of each kind (2^22 elements each at most)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--codec", action="append", help="only these labels (repeatable)")
    parser.add_argument("--ans", action="store_true", help="also tallzip's planes+ans (slow: ~50 MB/s)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if (args.cache is None) == (args.base is None) or (args.base is None) != (args.task_dir is None):
        parser.error("give --cache, or --base and --task-dir")

    import blosc2
    from benchmarks.fixtures import ensure
    from benchmarks.speed.suite import loadavg
    torch.set_num_threads(1)
    print("$ python -m benchmarks.speed codecs " + " ".join(sys.argv[1:] if argv is None else argv))
    versions = f"blosc2 {blosc2.__version__} (c-blosc2 {blosc2.blosclib_version.split()[0]})"
    try:
        import zstandard
        versions += f", zstandard {zstandard.__version__} (libzstd {zstandard.ZSTD_VERSION})"
    except ImportError:
        pass
    print(f"{versions}; load average {loadavg()}")
    codecs = candidates(set(args.codec) if args.codec else None, args.ans)
    results = []
    presets = {"vit": ("vit-b32", "ViT-B/32-shaped fp32"), "llm": ("llm-small", "LLM-shaped bf16 (small preset)")}
    for family in (["given"] if args.base else args.family):
        if family == "given":
            base, tasks = args.base, sorted(p for p in args.task_dir.iterdir() if not p.name.startswith("."))
            note = f"{args.base.parent}, N = {args.tasks}"
        else:
            base, tasks = ensure(args.cache, presets[family][0], args.tasks)
            note = f"{presets[family][1]} family, N = {args.tasks}"
        chunks = family_chunks(base, tasks[:args.tasks], args.chunks)
        sizes = ", ".join(f"{k}: {len(v)} x {v[0].size:,} elements" for k, v in chunks.items())
        rows = measure(chunks, codecs, args.repeats)
        report(rows, f"\n{note} ({sizes}); median of {args.repeats}; load average now {loadavg()}")
        results += [dict(r, family=family) for r in rows]
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))

