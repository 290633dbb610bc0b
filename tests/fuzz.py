"""Fuzz the archive reader: damaged archives are refused or harmless, never silently wrong.

    python tests/fuzz.py                           # 10,000 random corruptions + 1,000 hostile manifests
    python tests/fuzz.py --cases 1000 --hostile 300 --seed 1

Packs a small family (3 tasks, tiny ViT-shaped tensors), then for each case damages a copy of the
archive, opens it with `tallzip.open` and loads every task. Kinds of damage:

- bit flip: 1-4 random bits anywhere;  byte run: 1-256 bytes overwritten (random, zeros or 0xff);
- truncation: cut at a random length;  swapped sections: the bytes of two sections exchanged
  (as many as the shorter one holds);
- header: random bytes in the header's fields;  unprotected: bit flips in the bytes no checksum
  covers (the header's reserved field and the zero padding between sections).

Each case is `refused` (tallzip raised its own error: FormatError or TallzipError), `exact` (every
task came back bit for bit as from the undamaged archive) or `wrong` (anything else loaded: a
silently wrong model). Any other exception is a crash. The test suite runs 1,000 cases and requires
0 wrong and 0 crashes.

Hostile manifests are a different question: an edited manifest with a recomputed checksum is a
valid archive as far as bytes go, and may decode to another model (a changed dtype, say). What it
must not do is crash the reader, write outside the output folder or allocate without bound: each
such case is `refused`, `exact` or `accepted` (decodes to something else), and never a crash.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import struct
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import zstandard

import tallzip
from tallzip.demo import make_family
from tallzip.errors import TallzipError
from tallzip.formats.container.constants import FLAG_MANIFEST_ZSTD, HEADER_SIZE, HEADER_STRUCT, SECTION_ALIGNMENT
from tallzip.formats.errors import FormatError
from tallzip.options import RunOptions, StoreOptions

DAMAGE_KINDS = ("bit flip", "byte run", "truncation", "swapped sections", "header", "unprotected")
# Share of cases per kind: most are anywhere in the file, where they mostly hit section data.
DAMAGE_WEIGHTS = (0.35, 0.2, 0.15, 0.1, 0.1, 0.1)


def build_archive(folder: Path, n_tasks: int = 3, codecs: dict | None = None) -> Path:
    """A small family packed into folder/family.tallz (~90 KB), with the default codecs unless told."""
    base, tasks = make_family(folder, n_tasks, width=16, layers=1, patch=8, image=16, embed=8, frozen_width=8)
    archive = folder / "family.tallz"
    tallzip.pack(tasks, base, archive, store=StoreOptions(codecs=codecs), run=RunOptions(device="cpu"))
    return archive


def load_all(path: Path) -> dict:
    with tallzip.open(path) as archive:
        return {task: archive.load(task) for task in archive.tasks}


def same_models(got: dict, expected: dict) -> bool:
    """Same tasks, tensor names in the same order, dtypes, shapes and bits."""
    if list(got) != list(expected):
        return False
    for task, state in expected.items():
        other = got[task]
        if list(other) != list(state):
            return False
        for name, tensor in state.items():
            mine = other[name]
            if mine.dtype != tensor.dtype or mine.shape != tensor.shape:
                return False
            if not torch.equal(mine.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)):
                return False
    return True


def classify(path: Path, expected: dict, *, hostile: bool = False) -> str:
    """'refused', 'exact', or 'wrong' ('accepted' for hostile manifests); other errors propagate."""
    try:
        got = load_all(path)
    except (FormatError, TallzipError):
        return "refused"
    if same_models(got, expected):
        return "exact"
    return "accepted" if hostile else "wrong"


# --- damage ---------------------------------------------------------------------------------------

def stored_pieces(manifest: dict) -> list[dict]:
    """Every independently checked byte range: the chunks of a version-2 archive, the sections of a
    version-1 one (each {"offset", "length"})."""
    return [c for s in manifest["sections"] for c in s.get("chunks", [s])]


def unprotected_spans(data: bytes, manifest: dict) -> list[tuple[int, int]]:
    """Byte ranges no checksum covers: the header's reserved field, the padding between chunks, and
    bytes no section names (readers ignore them)."""
    spans = [(64, HEADER_SIZE)]
    position = HEADER_SIZE
    for entry in sorted(stored_pieces(manifest), key=lambda s: s["offset"]):
        if entry["offset"] > position:
            spans.append((position, entry["offset"]))
        position = max(position, entry["offset"] + entry["length"])
    manifest_offset = struct.unpack(HEADER_STRUCT, data[:HEADER_SIZE])[3]
    if manifest_offset > position:
        spans.append((position, manifest_offset))
    return spans


def damage(data: bytes, manifest: dict, kind: str, rng: np.random.Generator) -> bytes:
    out = bytearray(data)
    size = len(out)
    if kind == "bit flip":
        for _ in range(rng.integers(1, 5)):
            position = int(rng.integers(size))
            out[position] ^= 1 << int(rng.integers(8))
    elif kind == "byte run":
        start = int(rng.integers(size))
        length = int(min(size - start, rng.integers(1, 257)))
        fill = rng.integers(3)
        run = rng.integers(0, 256, length, dtype=np.uint8).tobytes() if fill == 0 else bytes([0 if fill == 1 else 255]) * length
        out[start:start + length] = run
    elif kind == "truncation":
        del out[int(rng.integers(size)):]
    elif kind == "swapped sections":
        pieces = stored_pieces(manifest)
        a, b = (pieces[i] for i in rng.choice(len(pieces), 2, replace=False))
        n = min(a["length"], b["length"])
        first, second = out[a["offset"]:a["offset"] + n], out[b["offset"]:b["offset"] + n]
        out[a["offset"]:a["offset"] + n], out[b["offset"]:b["offset"] + n] = second, first
    elif kind == "header":
        position = int(rng.integers(8, 64))  # version, flags, manifest offset and length, digest
        out[position] ^= int(rng.integers(1, 256))  # always a change
    elif kind == "unprotected":
        spans = unprotected_spans(data, manifest)
        begin, end = spans[int(rng.integers(len(spans)))]
        out[int(rng.integers(begin, end))] ^= 1 << int(rng.integers(8))
    else:
        raise ValueError(kind)
    return bytes(out)


def reference(archive: Path) -> tuple[bytes, dict, dict]:
    """The intact archive's bytes, its manifest and every task's tensors, to damage and compare with."""
    with tallzip.open(archive) as opened:
        manifest = opened.manifest
    return archive.read_bytes(), manifest, load_all(archive)


def run_damage(archive: Path, cases: int, seed: int, workdir: Path) -> tuple[Counter, list]:
    """Counter of (kind, outcome) over `cases` damaged copies, and the crashes (kind, repr)."""
    data, manifest, expected = reference(archive)
    rng = np.random.default_rng(seed)
    counts, crashes = Counter(), []
    target = workdir / "damaged.tallz"
    for kind in rng.choice(DAMAGE_KINDS, size=cases, p=DAMAGE_WEIGHTS):
        target.write_bytes(damage(data, manifest, str(kind), rng))
        try:
            counts[kind, classify(target, expected)] += 1
        except Exception as exc:  # noqa: BLE001 - a crash is what this looks for
            counts[kind, "crash"] += 1
            crashes.append((str(kind), f"{type(exc).__name__}: {exc}"))
    return counts, crashes


# --- hostile manifests (valid checksums) ---------------------------------------------------------

def write_with_manifest(data: bytes, manifest, path: Path, *, blob: bytes | None = None, extra: bytes = b"",
                        compress: bool | None = None, flags: int | None = None) -> int:
    """The archive `data` with its manifest replaced (and `extra` bytes placed before it), header
    fixed up so that every checksum matches: what a hostile writer can make. The JSON (`manifest`,
    or the bytes `blob`) is stored as one zstd frame (header flag bit 0) when `compress`, plain when
    not; None: as `data`'s own manifest is stored. `flags` overrides the header's flags. Returns the
    offset where `extra` starts."""
    _, version, data_flags, old_offset, _, _, _ = struct.unpack(HEADER_STRUCT, data[:HEADER_SIZE])
    body = bytearray(data[:old_offset]) + extra
    body += b"\0" * (-len(body) % SECTION_ALIGNMENT)
    if blob is None:
        blob = json.dumps(manifest, separators=(",", ":")).encode()
    if compress is None:
        compress = bool(data_flags & FLAG_MANIFEST_ZSTD)
    if compress:
        blob = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(blob)
    if flags is None:
        flags = FLAG_MANIFEST_ZSTD if compress else 0
    header = struct.pack(HEADER_STRUCT, b"TALLZIP\0", version, flags, len(body), len(blob), hashlib.sha256(blob).digest(),
                         b"\0" * 8)
    body[:HEADER_SIZE] = header
    path.write_bytes(bytes(body) + blob)
    return old_offset


def _leaves(value, path=()):
    """Every (path, value) in a JSON tree, containers included."""
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, path + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _leaves(item, path + (index,))


HOSTILE_VALUES = (None, -1, 0, 2**63, 2**40, 1e308, float("nan"), True, "", "x", "../../escape", "F32", "BOOL",
                  [], {}, [-1], [2**40], [[[[1]]]], {"a": 1})


def hostile_edit(manifest: dict, rng: np.random.Generator) -> dict:
    edited = copy.deepcopy(manifest)
    paths = [p for p, _ in _leaves(edited) if p]
    path = paths[int(rng.integers(len(paths)))]
    parent = edited
    for key in path[:-1]:
        parent = parent[key]
    if rng.random() < 0.15 and isinstance(parent, dict):
        del parent[path[-1]]
    elif rng.random() < 0.1 and isinstance(parent, list):
        parent.append(copy.deepcopy(parent[path[-1]]))  # a duplicate entry
    else:
        parent[path[-1]] = copy.deepcopy(HOSTILE_VALUES[int(rng.integers(len(HOSTILE_VALUES)))])
    return edited


def run_hostile(archive: Path, cases: int, seed: int, workdir: Path) -> tuple[Counter, list]:
    data, manifest, expected = reference(archive)
    rng = np.random.default_rng(seed)
    counts, crashes = Counter(), []
    workdir = workdir / "hostile"
    workdir.mkdir()
    target = workdir / "archive.tallz"
    for _ in range(cases):
        edited = hostile_edit(manifest, rng)
        blob = json.dumps(edited, separators=(",", ":")).encode()  # NaN becomes the token NaN
        write_with_manifest(data, None, target, blob=blob)
        try:
            outcome = classify(target, expected, hostile=True)
            if outcome != "refused":  # a loadable archive must also extract inside its folder
                with tallzip.open(target) as opened:
                    opened.extract(None, workdir / "out", force=True)
                escaped = [p for p in workdir.iterdir() if p.name not in ("archive.tallz", "out")]
                if escaped:
                    raise AssertionError(f"extract wrote outside its folder: {escaped}")
            counts[outcome] += 1
        except (FormatError, TallzipError):
            counts["refused"] += 1  # refused on extract
        except Exception as exc:  # noqa: BLE001
            counts["crash"] += 1
            crashes.append(f"{type(exc).__name__}: {exc}")
    return counts, crashes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000, help="random corruptions")
    parser.add_argument("--hostile", type=int, default=1_000, help="hostile manifests with valid checksums")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        archive = build_archive(tmp / "family")
        print(f"archive: {archive.stat().st_size:,} bytes, {len(load_all(archive))} tasks; seed {args.seed}")
        start = time.perf_counter()
        counts, crashes = run_damage(archive, args.cases, args.seed, tmp)
        elapsed = time.perf_counter() - start
        outcomes = ("refused", "exact", "wrong", "crash")
        print(f"\n{args.cases:,} random corruptions ({elapsed:.1f} s, {1e3 * elapsed / max(args.cases, 1):.1f} ms each)")
        print(f"{'damage':<18}" + "".join(f"{o:>9}" for o in outcomes))
        for kind in DAMAGE_KINDS:
            print(f"{kind:<18}" + "".join(f"{counts[kind, o]:>9}" for o in outcomes))
        print(f"{'total':<18}" + "".join(f"{sum(v for (k, o), v in counts.items() if o == out):>9}" for out in outcomes))
        for kind, crash in crashes[:10]:
            print(f"crash ({kind}): {crash}")
        if args.hostile:
            start = time.perf_counter()
            hostile, hostile_crashes = run_hostile(archive, args.hostile, args.seed, tmp)
            elapsed = time.perf_counter() - start
            print(f"\n{args.hostile:,} hostile manifests with valid checksums ({elapsed:.1f} s): "
                  + ", ".join(f"{o} {hostile[o]}" for o in ("refused", "exact", "accepted", "crash")))
            for crash in hostile_crashes[:10]:
                print(f"crash: {crash}")
            crashes = crashes + hostile_crashes
    return 1 if crashes or any(o == "wrong" for _, o in counts) else 0


if __name__ == "__main__":
    raise SystemExit(main())
